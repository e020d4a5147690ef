"""Conversations as text: a persistent store of sessions and their message trees."""

from ember.sessions.data_dir import default_data_dir, default_store_path
from ember.sessions.queries import AmbiguousIdError, NotFoundError
from ember.sessions.records import Message, Session
from ember.sessions.store import ANY_OWNER, AT_HEAD, UNCHANGED, SessionStore

__all__ = [
    "ANY_OWNER",
    "AT_HEAD",
    "UNCHANGED",
    "AmbiguousIdError",
    "Message",
    "NotFoundError",
    "Session",
    "SessionStore",
    "default_data_dir",
    "default_store_path",
]
