"""Checkpoints: load them safely, know where they came from, fetch the official one.

Every loaded checkpoint carries a `ModelCard`, because a contour is only as
trustworthy as the weights behind it and the licence decides who may use it.
Project checkpoints are safetensors files that carry their card in the file's
own metadata; other files get a card from the registry of known weights (by
SHA-256 or file name) or an "unknown origin" card.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from autocontour.errors import WeightsError
from autocontour.model.universeg import UniverSeg

RESEARCH_ONLY_NOTICE = (
    "The official UniverSeg weights are licensed under OpenRAIL++-M for research use only: "
    "results made with them must not be used for patient care."
)
CARD_METADATA_KEY = "autocontour.model_card"


class ModelCard(BaseModel):
    """What a result must say about the weights that made it."""

    name: str
    version: str
    sha256: str
    input_size: int = 128
    encoder_blocks: list[int] = [64, 64, 64, 64]
    licence: str
    source: str
    research_only: bool = False
    notice: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class KnownWeights:
    """A checkpoint we can name, describe and (for public ones) download."""

    name: str
    version: str
    file_name: str
    url: str | None
    sha256: str | None  # None: not published, so the download cannot be pinned
    licence: str
    research_only: bool
    description: str


OFFICIAL_V1 = KnownWeights(
    name="universeg-v1",
    version="v1 (nf64, ss64, STA)",
    file_name="universeg_v1_nf64_ss64_STA.pt",
    url="https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt",
    sha256=None,
    licence="OpenRAIL++-M (weights, research use only); Apache-2.0 (code)",
    research_only=True,
    description="Official UniverSeg weights from Butoi et al., ICCV 2023, trained on MegaMedical.",
)
KNOWN_WEIGHTS = {OFFICIAL_V1.name: OFFICIAL_V1}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a .safetensors or .pt file without executing code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise WeightsError(f"{path.name} is not a readable PyTorch checkpoint: {exc}") from exc
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise WeightsError(f"{path.name} does not hold a state dict of tensors")
        return {k.removeprefix("module."): v for k, v in obj.items()}
    raise WeightsError(f"unsupported weights format {path.suffix!r}: use .safetensors or .pt")


def check_layout(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise one error naming every missing, unexpected or mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {', '.join(misshaped)}")
    if problems:
        raise WeightsError(f"{source} does not fit UniverSeg{model.encoder_blocks}: " + "; ".join(problems))


def read_card(path: Path, sha256: str) -> ModelCard:
    """The card stored in the file, else the registry's, else an honest unknown."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if CARD_METADATA_KEY in meta:
            card = ModelCard.model_validate_json(meta[CARD_METADATA_KEY])
            return card.model_copy(update={"sha256": sha256})
    for known in KNOWN_WEIGHTS.values():
        if (known.sha256 and known.sha256 == sha256) or (known.sha256 is None and path.name == known.file_name):
            return ModelCard(
                name=known.name,
                version=known.version,
                sha256=sha256,
                licence=known.licence,
                source=known.url or path.name,
                research_only=known.research_only,
                notice=RESEARCH_ONLY_NOTICE if known.research_only else None,
                description=known.description,
            )
    # No card and not recognised: a renamed copy of the official weights would land here, so the
    # result says what it cannot rule out.
    return ModelCard(
        name=path.stem,
        version="unknown",
        sha256=sha256,
        licence="unknown: user-supplied checkpoint, check its licence before clinical use",
        source=path.name,
        notice="Weights of unknown provenance (no model card in the file). If they are the official UniverSeg "
               "weights under another name, they are licensed for research use only.",
    )


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[UniverSeg, ModelCard]:
    """Load a checkpoint into a UniverSeg of the right width, in eval mode."""
    path = Path(path)
    state_dict = read_state_dict(path)
    width_keys = [f"enc_blocks.{i}.cross.cross_conv.weight" for i in range(4)]
    widths = [int(state_dict[k].shape[0]) for k in width_keys if k in state_dict]
    model = UniverSeg(widths if len(widths) == 4 else [64, 64, 64, 64])  # else check_layout names the gaps
    check_layout(state_dict, model, path.name)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    card = read_card(path, sha256_of(path))
    card = card.model_copy(update={"encoder_blocks": model.encoder_blocks})
    return model.to(device).eval(), card


def save_checkpoint(model: UniverSeg, path: Path, card: ModelCard) -> str:
    """Write weights as safetensors with the card inside; returns the file's SHA-256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    card_json = card.model_copy(update={"sha256": ""}).model_dump_json()
    save_file(tensors, str(path), metadata={CARD_METADATA_KEY: card_json})
    return sha256_of(path)


def interpolate(start: Path, end: Path, share: float) -> tuple[UniverSeg, ModelCard]:
    """(1 - share) x `start` + share x `end`, weight by weight (WiSE-FT, Wortsman et al., CVPR 2022).

    Fine-tuning for robustness under distribution shift (here: new patients) can cost accuracy on the
    original distribution; interpolating the fine-tuned weights with their starting point keeps much of
    both. Returns the model and a card that names both and stays research-only if either is."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the share of the second checkpoint must be between 0 and 1, not {share}")
    model, start_card = load_model(start)
    other, end_card = load_model(end)
    if model.encoder_blocks != other.encoder_blocks:
        raise ValueError(f"{Path(start).name} and {Path(end).name} have different network widths")
    a, b = model.state_dict(), other.state_dict()
    model.load_state_dict({k: (1 - share) * a[k] + share * b[k] for k in a})
    restricted = [c for c in (start_card, end_card) if c.research_only]
    card = end_card.model_copy(update={
        "name": f"{end_card.name}-interpolated", "sha256": "",
        "version": f"{1 - share:g} x {start_card.name} + {share:g} x {end_card.name}",
        "source": f"autocontour weights interpolate {Path(start).name} {Path(end).name} --share {share:g}",
        "research_only": bool(restricted),
        "licence": restricted[0].licence if restricted else end_card.licence,
        "notice": restricted[0].notice if restricted else end_card.notice,
        "description": f"interpolated; {end_card.name}'s description: {end_card.description}"})
    return model, card


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autocontour" / "weights"


def download(known: KnownWeights, cache_dir: Path, sha256: str | None = None, url: str | None = None,
             progress: bool = True, timeout_s: float = 60.0) -> tuple[Path, str]:
    """Fetch a known checkpoint into the cache, verify it, and check that it loads.

    `sha256` pins the expected digest (the registry's, if it has one, is used
    otherwise). The file is written to a temporary name and moved into place
    only once it is complete, verified and loadable, so an interrupted or
    corrupt download never leaves a file that looks valid. Returns the path
    and the digest.
    """
    url = url or known.url
    if not url:
        raise WeightsError(f"{known.name} has no download URL")
    expected = (sha256 or known.sha256 or "").lower() or None
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / known.file_name
    if target.is_file() and expected and sha256_of(target) == expected:
        return target, expected

    fd, tmp_name = tempfile.mkstemp(prefix=".download-", suffix=Path(known.file_name).suffix, dir=cache_dir)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "autocontour"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=known.file_name, disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise WeightsError(f"download of {known.file_name} stopped early ({out.tell()} of {total} bytes)")
        got = digest.hexdigest()
        if expected and got != expected:
            raise WeightsError(f"SHA-256 mismatch for {known.file_name}: expected {expected}, got {got}")
        check_layout(read_state_dict(tmp), UniverSeg(), known.file_name)
        os.replace(tmp, target)
        return target, got
    except (OSError, http.client.HTTPException) as exc:
        raise WeightsError(f"could not download {known.name} from {url}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
