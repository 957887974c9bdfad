"""What the route handlers need from the running app, as typed FastAPI dependencies.

The lifespan (autocontour.server.main) puts the app's parts on `app.state`, which is typed Any; each
dependency here reads one part and names its type, so a handler's signature says what it uses.
"""

from __future__ import annotations

import threading
from typing import Annotated, Protocol

from fastapi import Depends, Request

from autocontour.pipeline import Segmenter
from autocontour.pipeline.library import Library
from autocontour.server.jobs import JobStore, ResultStore
from autocontour.server.metrics import Metrics
from autocontour.server.queue import JobQueue
from autocontour.server.review import ReviewCache
from autocontour.server.settings import ServerSettings


class DescribesModel(Protocol):
    def describe_model(self) -> dict: ...


def _settings(request: Request) -> ServerSettings:
    return request.app.state.settings


def _library(request: Request) -> Library:
    return request.app.state.library


def _segmenter(request: Request) -> Segmenter | None:
    """The network of this process: None where workers run it (Celery) or none was given (tests)."""
    return request.app.state.segmenter


def _model(request: Request) -> DescribesModel:
    """Whatever describes the model here: the loaded network, else the library's card."""
    return request.app.state.segmenter or request.app.state.library


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def _results(request: Request) -> ResultStore:
    return request.app.state.results


def _review(request: Request) -> ReviewCache:
    return request.app.state.review


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _decodes(request: Request) -> threading.BoundedSemaphore:
    return request.app.state.decodes


SettingsDep = Annotated[ServerSettings, Depends(_settings)]
LibraryDep = Annotated[Library, Depends(_library)]
SegmenterDep = Annotated[Segmenter | None, Depends(_segmenter)]
ModelDep = Annotated[DescribesModel, Depends(_model)]
QueueDep = Annotated[JobQueue, Depends(_queue)]
JobsDep = Annotated[JobStore, Depends(_jobs)]
ResultsDep = Annotated[ResultStore, Depends(_results)]
ReviewDep = Annotated[ReviewCache, Depends(_review)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
DecodesDep = Annotated[threading.BoundedSemaphore, Depends(_decodes)]
