"""DICOM in (series, PACS) and out (RTSTRUCT, DICOM-SEG)."""

# How the RTSTRUCT names its ROIs: the catalogue's display names, or TG-263 names where a structure has one.
ROI_NAME_STYLES = ("display", "tg263")

# The series description of the RTSTRUCT and DICOM-SEG autocontour writes as drafts; also how a draft of ours is
# recognised when it comes back as a would-be support case.
DRAFT_DESCRIPTION = "autocontour draft - not approved"
