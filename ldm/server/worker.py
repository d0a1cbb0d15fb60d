"""The work queue: one worker thread owns the loaded model and runs one job at a time, in arrival order.

A job is a function of the pipeline (``run(pipe, job) -> result``) plus the model it needs; the worker
loads that model when it is not the one loaded (once, not per request) and keeps it. While a job runs,
it reports its progress here (:class:`Job`: images done, steps done, the latest denoised latents for
a preview); :meth:`Worker.interrupt` and :meth:`Worker.skip` ask the running job to stop after the
current step. A job whose client went away is dropped if still waiting and interrupted if running,
so a lost client never holds the queue.

One exception to "the worker owns the model": a preview (:meth:`Job.current_image`) is decoded by the
VAE on the thread that asks for it, as AUTOMATIC1111 does, and only when one is asked for; decoding
is a pure forward pass, so it runs safely beside the sampling.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import torch

from ldm.errors import LdmError
from ldm.image_inputs import to_pil
from ldm.pipeline import Txt2ImgPipeline
from ldm.server.catalogue import ModelEntry
from ldm.server.limits import RequestError

logger = logging.getLogger(__name__)

RECENT_JOBS = 256  # finished jobs remembered for /internal/progress


class QueueFull(Exception):
    """More jobs waiting than the server's limit."""


class JobFailed(Exception):
    """A job ended in an error meant for the client: ``status`` and a one-line ``message`` naming ``field``."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class Job:
    """One queued unit of work and its live state (written by the worker, read by request threads).

    ``run(pipe, job)`` does the work; it reports through :meth:`begin_image`, :meth:`step` and
    :meth:`preview`, and polls :meth:`should_stop` (the pipeline's ``interrupt`` hook).
    """

    def __init__(self, kind: str, model: ModelEntry, run: Callable[[Txt2ImgPipeline, "Job"], Any],
                 task_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.kind, self.model, self.run, self.id = kind, model, run, task_id
        self.state = "queued"  # -> "running" -> "done"
        self.interrupted = threading.Event()  # stop this job (its finished images are kept)
        self.skipped = threading.Event()  # stop the current image only
        self.abandoned = False  # the client went away
        self.job_count, self.job_no, self.sampling_step, self.sampling_steps = 0, 0, 0, 0
        self.time_start: float | None = None
        self.preview_every = 1
        self._preview_lock = threading.Lock()
        self._preview_latents: torch.Tensor | None = None
        self._preview_pipe: Txt2ImgPipeline | None = None
        self.preview_id = 0  # counts the latents recorded
        self._preview_png: tuple[int, str] | None = None  # (preview_id, base64 PNG)
        self.result: Any = None
        self.error: JobFailed | None = None
        self._loop = loop
        self.future: asyncio.Future | None = loop.create_future() if loop is not None else None
        self.done = threading.Event()

    # ------------------------------------------------------------------ reported by the running job

    def begin_image(self, index: int, count: int, steps: int) -> None:
        """Image ``index`` of ``count`` starts, with ``steps`` sampling steps."""
        self.job_no, self.job_count, self.sampling_step, self.sampling_steps = index, count, 0, steps
        self.skipped.clear()

    def step(self, done: int, total: int) -> None:
        """The pipeline's ``progress`` hook."""
        self.sampling_step, self.sampling_steps = done, total

    def preview(self, pipe: Txt2ImgPipeline) -> Callable[[torch.Tensor], None]:
        """The pipeline's ``preview`` hook: keep every ``preview_every``-th step's denoised latents and the
        last step's (AUTOMATIC1111's ``show_progress_every_n_steps``: -1 the last step only, 0 none)."""

        def record(x0: torch.Tensor) -> None:
            last = self.sampling_step == self.sampling_steps
            if (self.preview_every > 0 and self.sampling_step % self.preview_every == 0) or \
                    (self.preview_every != 0 and last):
                with self._preview_lock:
                    self._preview_latents, self._preview_pipe = x0[:1].detach().clone(), pipe
                    self.preview_id += 1

        return record

    def should_stop(self) -> bool:
        """The pipeline's ``interrupt`` hook: interrupted, skipped, or the client is gone."""
        return self.interrupted.is_set() or self.skipped.is_set() or self.abandoned

    # ------------------------------------------------------------------ read by request threads

    @property
    def progress(self) -> float:
        """Fraction done in [0, 1] (images done plus the running image's share)."""
        if self.state == "done":
            return 1.0
        if self.job_count == 0:
            return 0.0
        within = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.job_no + within) / self.job_count)

    @property
    def eta_relative(self) -> float:
        """Seconds left, extrapolated from the time spent so far (0 before any progress)."""
        progress = self.progress
        if self.time_start is None or progress <= 0:
            return 0.0
        spent = time.monotonic() - self.time_start
        return max(0.0, spent / progress - spent)

    def current_image(self) -> str | None:
        """The latest preview as a base64 PNG, decoded here on demand (once per recorded step)."""
        with self._preview_lock:
            latents, pipe, preview_id = self._preview_latents, self._preview_pipe, self.preview_id
            if latents is None:
                return None
            if self._preview_png is not None and self._preview_png[0] == preview_id:
                return self._preview_png[1]
            image = to_pil(pipe.decode(latents.to(pipe.device)))[0]
            self._preview_png = (preview_id, png_base64(image))
            return self._preview_png[1]

    # ------------------------------------------------------------------ completion

    def finish(self, result: Any = None, error: JobFailed | None = None) -> None:
        self.result, self.error, self.state = result, error, "done"
        with self._preview_lock:
            self._preview_latents = self._preview_pipe = None  # the model may be replaced later
        self.done.set()
        if self.future is not None:
            self._loop.call_soon_threadsafe(_settle, self.future)


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def png_base64(image, parameters: str | None = None) -> str:
    """A PIL image as base64 PNG text, with a ``parameters`` text chunk when given."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Worker:
    """The queue and its one thread. ``load(entry) -> pipeline`` loads a model (called on the thread)."""

    def __init__(self, load: Callable[[ModelEntry], Txt2ImgPipeline], max_queue: int) -> None:
        self._load = load
        self.max_queue = max_queue
        self.pipe: Txt2ImgPipeline | None = None
        self.loaded: ModelEntry | None = None
        self.current: Job | None = None
        self._waiting: deque[Job] = deque()
        self._recent: OrderedDict[str, Job] = OrderedDict()
        self._condition = threading.Condition()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._serve, name="generation-worker", daemon=True)

    def start(self, initial: ModelEntry) -> None:
        """Load the start-up model (errors reach the caller) and start the thread."""
        self.pipe, self.loaded = self._load(initial), initial
        self._thread.start()

    # ------------------------------------------------------------------ queue

    def submit(self, kind: str, model: ModelEntry, run: Callable[[Txt2ImgPipeline, Job], Any],
               task_id: str | None = None, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a job; :class:`QueueFull` when ``max_queue`` jobs already wait."""
        with self._condition:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} jobs are waiting, this server's limit")
            job = Job(kind, model, run, task_id or f"job-{next(self._ids)}", loop)
            self._waiting.append(job)
            self._remember(job)
            self._condition.notify()
        return job

    def _remember(self, job: Job) -> None:
        self._recent[job.id] = job
        while len(self._recent) > RECENT_JOBS:
            self._recent.popitem(last=False)

    def find(self, task_id: str) -> Job | None:
        with self._condition:
            return self._recent.get(task_id)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of ``job`` in the queue (the running one included); ``None`` unless it waits."""
        with self._condition:
            if job not in self._waiting:
                return None
            return self._waiting.index(job) + (1 if self.current is not None else 0)

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    def abandon(self, job: Job) -> None:
        """The client went away: drop ``job`` if it waits, stop it after the current step if it runs."""
        with self._condition:
            job.abandoned = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.finish(error=JobFailed(499, "the client closed the connection"))

    def interrupt(self) -> None:
        """Stop the running job after its current step (AUTOMATIC1111's Interrupt); queued jobs still run."""
        job = self.current
        if job is not None:
            job.interrupted.set()

    def skip(self) -> None:
        """Stop the running job's current image after its current step; the job goes on with the next."""
        job = self.current
        if job is not None:
            job.skipped.set()

    # ------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._waiting:
                    self._condition.wait()
                job = self._waiting.popleft()
                self.current = job
            try:
                self._run(job)
            finally:
                with self._condition:
                    self.current = None

    def _run(self, job: Job) -> None:
        job.state, job.time_start = "running", time.monotonic()
        try:
            pipe = self._ensure_loaded(job.model)
            job.finish(result=job.run(pipe, job))
        except RequestError as error:
            job.finish(error=JobFailed(error.status, error.message, error.field))
        except LdmError as error:  # a value the pipeline refused, a model that does not load
            job.finish(error=JobFailed(422, str(error).splitlines()[0] if str(error) else type(error).__name__))
        except Exception:  # a bug: the log gets the traceback, the client one line
            logger.exception("job %s (%s) failed", job.id, job.kind)
            job.finish(error=JobFailed(500, "internal error (the server log has the details)"))

    def _ensure_loaded(self, entry: ModelEntry) -> Txt2ImgPipeline:
        if self.loaded != entry:
            logger.info("loading model %s", entry.title)
            pipe = self._load(entry)  # on failure the loaded model stays
            self.pipe, self.loaded = pipe, entry
        return self.pipe
