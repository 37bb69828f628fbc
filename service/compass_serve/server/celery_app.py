"""The Celery application both sides share: API processes publish with it, workers consume.

Reliability comes from the settings here rather than from code: jobs are acknowledged late (after
they ran) and rejected back to the queue when the worker process running them dies; the Redis
transport redelivers any job left unacknowledged for `visibility_timeout` (a worker that was
SIGKILLed, or whose machine vanished). One job is prefetched at a time, so a busy worker does not
sit on jobs another could run.
"""

from __future__ import annotations

from celery import Celery

from compass_serve.server.settings import Settings

ENCODE_QUEUE = "compass-encode"
DECODE_QUEUE = "compass-decode"
ENCODE_TASK = "compass.encode"
RENDER_TASK = "compass.render"


def encode_task_id(image_id: str) -> str:
    """Jobs are keyed by image id: every copy of one image's job carries the same task id."""
    return f"encode-{image_id}"


def make_celery(settings: Settings) -> Celery:
    app = Celery("compass_serve", broker=settings.broker_url,
                 backend=settings.result_backend or settings.broker_url, set_as_current=False)
    vt = settings.visibility_timeout_s
    transport = {
        "visibility_timeout": vt,
        # Look for abandoned jobs often enough that redelivery takes about `vt`, not vt + 100 s.
        "unacked_restore_interval": max(1, min(10, vt // 3)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 3,
        "socket_timeout": 30,
    }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_default_queue=ENCODE_QUEUE,
        task_routes={ENCODE_TASK: {"queue": ENCODE_QUEUE}, RENDER_TASK: {"queue": DECODE_QUEUE}},
        broker_transport_options=transport,
        result_backend_transport_options={"socket_connect_timeout": 3, "socket_timeout": 30},
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis to come back, forever
        result_expires=3600,
        task_ignore_result=True,  # encode outcomes live in the database; render results opt in
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
