"""Settings, from `AUTOCONTOUR_*` environment variables (pydantic-settings).

One place for every default the CLI, the Python API and the server share,
including the per-device inference defaults: a 2-core CPU must stay practical,
a GPU can afford a full support set and an ensemble.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from autocontour.model.weights import default_cache_dir

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS_NAME = "autocontour-universeg-v2.safetensors"


class Settings(BaseSettings):
    """Core settings; the server extends them."""

    model_config = SettingsConfigDict(env_prefix="AUTOCONTOUR_", extra="ignore")

    home: Path = Field(PACKAGE_ROOT, description="folder holding models/ and support_sets/")
    weights: Path | None = Field(None, description="checkpoint to load; default: the shipped project weights")
    support_dirs: list[Path] = Field(default_factory=list, description="extra support-set folders (a clinic's own)")
    shipped_support: bool = Field(True, description="also use the support sets shipped in support_sets/")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="where the network runs: auto (the GPU if there is one), cpu, cuda or cuda:N")
    precision: str | None = Field(None, pattern="^(float32|bfloat16|float16)$",
                                  description="default: bfloat16 on CUDA; on CPU bfloat16 where the CPU has native "
                                              "bf16 and a start-up check finds the masks unchanged, else float32")
    cpu_support_size: int = Field(16, ge=1, le=256,
                                  description="16: the most accurate size that keeps the example under 60 s on "
                                              "2 cores (bench/RESULTS.md)")
    cpu_ensemble: int = Field(1, ge=1, le=16, description="support subsets averaged per slice on CPU")
    cuda_support_size: int = Field(64, ge=1, le=256, description="support slices per ensemble member on a GPU")
    cuda_ensemble: int = Field(3, ge=1, le=16, description="support subsets averaged per slice on a GPU")
    threads: int | None = Field(None, ge=1, description="CPU threads for the network (default: all cores)")
    compile: bool = Field(False, description="torch.compile the network (paid once at start-up by warm-up)")
    threshold: float = Field(0.5, gt=0, lt=1, description="probability above which a voxel is in the mask")
    rules: Path | None = Field(None, description="overlap-rules JSON file (default: the shipped cervix rules)")
    confidence_calibration: Path | None = Field(
        None, description="a calibration JSON (bench/calibrate_confidence.py fit) that turns each structure's "
                          "confidence into estimated_surface_dice, for the weights it was fitted for; default: "
                          "none (the project ships none: a clinic fits its own)")
    max_voxels: int = Field(1 << 30, gt=0, description="most voxels an input CT may have, checked from its header")
    max_dicom_files: int = Field(5000, ge=1, description="most files in a DICOM zip or folder")
    max_dicom_bytes: int = Field(4 << 30, ge=1, description="most bytes a DICOM zip may inflate to")
    max_decoded_bytes: int = Field(1 << 30, ge=1, description="most memory decoding one CT may take: voxels x "
                                                              "(stored bytes per voxel + the larger of that and 4), "
                                                              "checked from the headers before decoding")
    max_compression_ratio: float = Field(500.0, ge=1, description="most a CT's .nii.gz or DICOM zip may inflate "
                                                                  "per compressed byte (CTs: 2-30; a small body "
                                                                  "padded with air up to 123; zeros: 1000)")
    scratch_dir: Path | None = Field(None, description="where temporary copies of patient data go (an extracted "
                                                        "DICOM zip, a PACS download); default: the system's "
                                                        "temporary folder. Each CLI run works in a locked folder of "
                                                        "its own under autocontour-cli/ there, removed when it ends "
                                                        "and swept by the next run if it was killed; the server and "
                                                        "its workers use AUTOCONTOUR_DATA_DIR/tmp instead")
    weights_cache: Path = Field(default_factory=default_cache_dir,
                                description="where `autocontour weights download` stores checkpoints; default: "
                                            "$XDG_CACHE_HOME/autocontour/weights, else ~/.cache/autocontour/weights")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def shipped_support_dir(self) -> Path:
        return self.home / "support_sets"

    @property
    def default_weights(self) -> Path:
        return self.models_dir / DEFAULT_WEIGHTS_NAME

    def support_folders(self, extra: list[Path] | None = None, shipped: bool | None = None) -> list[Path]:
        """Folders to search for support sets, later ones overriding earlier ones."""
        use_shipped = self.shipped_support if shipped is None else shipped
        return ([self.shipped_support_dir] if use_shipped else []) + list(self.support_dirs) + list(extra or [])

    def device_defaults(self, device_type: str) -> tuple[int, int, str]:
        """(support size, ensemble, precision) for a device type."""
        if device_type == "cuda":
            return self.cuda_support_size, self.cuda_ensemble, self.precision or "bfloat16"
        return self.cpu_support_size, self.cpu_ensemble, self.precision or "auto"
