"""Handing admitted requests to model workers and awaiting their results."""

from gateway.dispatch.queue import Dispatcher, QueueUnavailable, queue_depth
from gateway.dispatch.results import ResultWaiter, ResultTimeout

__all__ = ["Dispatcher", "QueueUnavailable", "ResultTimeout", "ResultWaiter", "queue_depth"]
