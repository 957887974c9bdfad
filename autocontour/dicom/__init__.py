"""DICOM in (series, PACS) and out (RTSTRUCT, DICOM-SEG)."""

# How the RTSTRUCT names its ROIs: the catalogue's display names, or TG-263 names where a structure has one.
ROI_NAME_STYLES = ("display", "tg263")
