"""Loader workers: processes or threads, each call within a time bound.

Worker processes fork from a server that has imported the pipeline once
(`worker_type='process'`, past the GIL), or the calls run on threads. Each
call has a time bound (`ClipSpec.decode_timeout_s`): a decoder that stalls
past it (a hung file system, a decoder that never returns) fails its call
with `clip_lib.DecodeTimeoutError`, and its video counts as bad. A stuck
worker process is killed and replaced; a stuck thread cannot be stopped and
is left behind (it holds its memory until its call returns, if ever). A
worker process that dies (a decoder's crash) fails its call with
`clip_lib.WorkerLostError`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from collections.abc import Iterator
import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import threading
import time
from typing import Any

import psutil

from tsformer_jax import clip_lib

# Each process worker's job, set once when it starts.
_WORKER_JOB: Any = None


def _start_worker(job: bytes | None, loader: int, started: float):
  global _WORKER_JOB
  _WORKER_JOB = pickle.loads(job) if job is not None else None
  threading.Thread(target=_exit_with, args=(loader, started),
                   daemon=True).start()


def _exit_with(loader: int, started: float):
  """Ends this worker once the loader's process (pid `loader`, started at
  `started`) is gone: a loader killed outright (SIGKILL) tells its workers
  nothing, and they would wait for work forever."""
  while True:
    try:
      process = psutil.Process(loader)
      if (process.create_time() != started or
          process.status() == psutil.STATUS_ZOMBIE):
        break
    except psutil.Error:
      break
    time.sleep(1.0)
  os._exit(0)  # pylint: disable=protected-access


def _in_worker(method: str, *args):
  return getattr(_WORKER_JOB, method)(*args)


WORKER_TYPES = ('process', 'thread')


@functools.cache
def _process_context() -> multiprocessing.context.BaseContext:
  # A fork server imports this module once; workers fork from it, so each
  # pool starts fast, and never from this (multithreaded, JAX) process.
  # Preloaded: the decoder, and the file source that a pickled job holds.
  context = multiprocessing.get_context('forkserver')
  context.set_forkserver_preload(['tsformer_jax.input_pipeline',
                                  'tsformer_jax.video_io',
                                  'tsformer_jax.datasets.video_files'])
  return context


def _serve(conn, job: bytes | None, loader: int, started: float):
  """A worker process: runs each `(fn, args, stream)` it receives and
  replies `('item', x)` for each item of a stream, then `('done', result)`
  or `('error', exception)`."""
  _start_worker(job, loader, started)
  conn.send(('ready', None))
  while True:
    try:
      fn, args, stream = conn.recv()
    except EOFError:  # The loader closed its end.
      return
    try:
      if stream:
        for item in fn(*args):
          conn.send(('item', item))
        reply = ('done', None)
      else:
        reply = ('done', fn(*args))
    except Exception as e:  # pylint: disable=broad-except
      reply = ('error', _portable(e))
    conn.send(reply)


def _portable(error: Exception) -> Exception:
  """`error` if it survives pickling, else a RuntimeError saying it."""
  try:
    pickle.loads(pickle.dumps(error))
    return error
  except Exception:  # pylint: disable=broad-except
    return RuntimeError(f'{type(error).__name__}: {error}')


class _ThreadRunner:
  """Runs each call on a new thread, waiting for it up to the time bound.

  A thread stuck in a decoder cannot be stopped: it is left behind, and
  its result, if it ever comes, dropped.
  """

  def __init__(self, job):
    self._job = job

  def call(self, method: str, args: tuple, timeout: float | None):
    done, result = threading.Event(), []

    def run():
      try:
        result.append((True, getattr(self._job, method)(*args)))
      except BaseException as e:  # pylint: disable=broad-except
        result.append((False, e))
      done.set()

    threading.Thread(target=run, daemon=True,
                     name='tsformer_jax-loader').start()
    if not done.wait(timeout):
      logging.warning('A loader thread is stuck past the time bound of '
                      '%g s; it is left running.', timeout)
      raise clip_lib.decode_timeout_error(timeout)
    ok, value = result[0]
    if ok:
      return value
    raise value

  def kill(self):
    """Threads cannot be stopped: nothing to do."""

  def stop(self):
    """Nothing to release."""


class DecodingProcess:
  """One worker process (started on first use) that runs a call at a time,
  each bounded by the time bound; one that overruns it, or ends, is
  killed, and the next call starts a fresh one.

  Args:
    job: a pickled `_Job` for `call`; None for `stream` alone.
  """

  def __init__(self, job: bytes | None = None):
    self._job = job
    self._process = None
    self._conn = None

  def _start(self):
    context = _process_context()
    self._conn, child = context.Pipe()
    me = psutil.Process()
    process = context.Process(
        target=_serve, args=(child, self._job, me.pid, me.create_time()),
        daemon=True, name='tsformer_jax-loader')
    process.start()
    child.close()
    self._process = process  # Started: `kill` may reach it from now on.
    try:  # Its start (imports, the job) is not the video's time.
      self._conn.recv()
    except (EOFError, OSError) as e:
      code = self._ended()
      raise RuntimeError(f'A loader worker process failed to start (exit '
                         f'code {code}).') from e

  def _send(self, message: tuple):
    if self._process is None:
      self._start()
    self._conn.send(message)

  def _reply(self, timeout: float | None) -> tuple:
    if not self._conn.poll(timeout):
      logging.warning('Killing a loader worker process stuck past the time '
                      'bound of %g s.', timeout)
      self.stop()
      raise clip_lib.decode_timeout_error(timeout)
    try:
      return self._conn.recv()
    except (EOFError, OSError) as e:
      code = self._ended()
      raise clip_lib.WorkerLostError(
          f'the worker process decoding it ended (exit code {code}).') from e

  def _ended(self) -> int | None:
    """Stops the process; its exit code (negative: the signal)."""
    process = self._process
    self.stop()
    return process.exitcode if process is not None else None

  def call(self, method: str, args: tuple, timeout: float | None):
    """`job.method(*args)` in the process."""
    self._send((_in_worker, (method,) + tuple(args), False))
    kind, value = self._reply(timeout)
    if kind == 'error':
      raise value
    return value

  def stream(self, fn: Callable[..., Iterator], args: tuple,
             timeout: float | None) -> Iterator:
    """The items of `fn(*args)` (a picklable function) run in the
    process, each within `timeout` seconds of asking for it."""
    self._send((fn, tuple(args), True))
    finished = False
    try:
      while True:
        kind, value = self._reply(timeout)
        if kind == 'item':
          yield value
          continue
        finished = True
        if kind == 'error':
          raise value
        return
    finally:
      if not finished:  # Left part way: its replies would come next.
        self.stop()

  def kill(self):
    """Ends the process now (from any thread); `stop` cleans up."""
    process = self._process
    if process is not None:
      process.kill()

  def stop(self):
    if self._process is not None:
      self._process.kill()
      self._process.join()
      self._conn.close()
      self._process = self._conn = None


class _Pool:
  """`num_workers` runners (`_ThreadRunner` or `DecodingProcess`), each
  fed one call at a time by a thread of its own, each call bounded by
  `timeout` seconds from its start."""

  def __init__(self, runners: list, timeout: float | None):
    self._runners = runners
    self._timeout = timeout
    self._calls = collections.deque()
    self._changed = threading.Condition()
    self._closed = False
    self._feeders = [threading.Thread(target=self._feed, args=(r,),
                                      daemon=True) for r in runners]
    for feeder in self._feeders:
      feeder.start()

  def submit(self, method: str, *args, first: bool = False
             ) -> concurrent.futures.Future:
    """`job.method(*args)`, after the calls waiting (before them if
    `first`: a failed video's replacement, which a batch waits for)."""
    future = concurrent.futures.Future()
    with self._changed:
      if first:
        self._calls.appendleft((future, method, args))
      else:
        self._calls.append((future, method, args))
      self._changed.notify()
    return future

  def _next(self) -> tuple | None:
    with self._changed:
      while not self._calls and not self._closed:
        self._changed.wait()
      return None if self._closed else self._calls.popleft()

  def _feed(self, runner):
    try:
      while (call := self._next()) is not None:
        future, method, args = call
        if not future.set_running_or_notify_cancel():
          continue
        try:
          future.set_result(runner.call(method, args, self._timeout))
        except BaseException as e:  # pylint: disable=broad-except
          future.set_exception(e)
    finally:
      runner.stop()

  def close(self):
    """Cancels the calls not started and ends the workers (a thread stuck
    in a decoder stays behind)."""
    with self._changed:
      self._closed = True
      for future, _, _ in self._calls:
        future.cancel()
      self._calls.clear()
      self._changed.notify_all()
    for runner in self._runners:
      runner.kill()
    # Calls running on threads end first, as a thread pool's would; up to
    # the time bound in all.
    deadline = None if self._timeout is None else (time.monotonic() +
                                                   self._timeout)
    for feeder in self._feeders:
      feeder.join(None if deadline is None else
                  max(deadline - time.monotonic(), 0.0))


@contextlib.contextmanager
def pool(job: Any, num_workers: int, worker_type: str,
         timeout: float | None = None
         ) -> Iterator[Callable[..., concurrent.futures.Future]]:
  """`submit(method, *args, first=False)`, running `job.method(*args)` on
  `num_workers` processes or threads (`first`: before the calls waiting),
  each call within `timeout` seconds of its start (else it fails with
  `clip_lib.DecodeTimeoutError`); a job that cannot be pickled runs on
  threads."""
  if worker_type not in WORKER_TYPES:
    raise ValueError(f'Unknown worker_type {worker_type!r}; valid: '
                     f'{list(WORKER_TYPES)}.')
  num_workers = max(num_workers, 1)
  payload = None
  if worker_type == 'process':
    try:
      payload = pickle.dumps(job)
    except Exception as e:  # pylint: disable=broad-except
      logging.info('Loading on threads: the source cannot be sent to '
                   'worker processes (%s).', e)
  runners = [_ThreadRunner(job) if payload is None else
             DecodingProcess(payload) for _ in range(num_workers)]
  running = _Pool(runners, timeout)
  try:
    yield running.submit
  finally:
    running.close()


