"""Server settings: `AUTOCONTOUR_*` environment variables and an optional TOML file.

`AUTOCONTOUR_CONFIG=/etc/autocontour.toml` names the file; environment
variables override it. API keys are stored as SHA-256 hashes (make one with
`autocontour keys hash`), never in clear.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from autocontour.config import Settings

SCOPES = ("segment", "read", "evaluate")
# Adding an approved case to a support set changes what the network draws for every later patient, so no key
# has it unless the clinic lists it: it is not among the default SCOPES.
SUPPORT_WRITE = "support:write"


class ApiKey(BaseModel):
    """One client's key: its SHA-256 and what it may do."""

    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of the key (`autocontour keys hash`)")
    scopes: list[str] = Field(list(SCOPES), description="what the key may do: segment, read, evaluate (the "
                                                        "default: all three), and support:write (only when "
                                                        "listed: add approved cases to the server's support sets)")


class ServerSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="AUTOCONTOUR_", extra="ignore", env_nested_delimiter="__")

    data_dir: Path = Field(Path("autocontour-data"), description="jobs database, uploads and results")
    max_upload_bytes: int = Field(1 << 30, gt=0, description="largest accepted upload (bytes)")
    max_queue: int = Field(16, ge=1, description="queued jobs before new uploads get 503 + Retry-After")
    max_concurrent_decodes: int = Field(2, ge=1, description="uploads checked (decoded) at once by the API; "
                                                             "more wait, up to Retry-After seconds, then get 503")
    retry_after_s: int = Field(30, ge=1, description="seconds in the Retry-After header of a 503 (queue full, broker "
                                                    "down, decode slots busy)")
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="finished jobs and results are deleted after this")
    wait_timeout_s: float = Field(600.0, gt=0, description="longest ?wait=true before answering 202")
    edit_timeout_s: float = Field(120.0, gt=0, description="longest an edit (propagate) waits for the network, "
                                                           "busy with a job, or for a Celery worker to answer, "
                                                           "before 503 + Retry-After")
    api_keys: dict[str, ApiKey] = Field(default_factory=dict, description="name -> key hash and scopes (default: "
                                        "segment, read, evaluate; support:write, to add approved cases to the "
                                        "server's support sets, only when listed); empty: no auth")
    queue: str = Field("local", pattern="^(local|celery)$",
                       description="local: in-process worker; celery: Redis + workers")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (broker and task results)")
    visibility_timeout_s: int = Field(7200, ge=10, description="a task unacknowledged this long is redelivered: "
                                                               "keep it above the longest job")
    max_attempts: int = Field(3, ge=1, description="deliveries of one job before it fails (workers that died)")
    worker_timeout_s: int = Field(10, ge=3, description="a worker whose heartbeat (every 2 s) is older than this is "
                                                        "dead: its job goes back to the queue")
    pacs_url: str | None = Field(None, description="DICOMweb root of a PACS to pull studies from and push results to")
    pacs_username: str | None = Field(None, description="user name for the PACS (HTTP basic auth)")
    pacs_password: str | None = Field(None, description="password for the PACS (HTTP basic auth); `pacs pull`, "
                                                         "`pacs push` and `support build --pacs-url` read it too "
                                                         "when no --password is given")
    warmup: bool = Field(True, description="run one forward pass at start-up so the first request is not slow")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("AUTOCONTOUR_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)
