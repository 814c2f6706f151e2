"""The store's exceptions: every refusal is a StoreError whose message says what is wrong and what
to do."""
from __future__ import annotations

import os
import socket
from typing import Any, Dict, Optional

__all__ = ["StoreError", "StoreLockedError"]


class StoreError(ValueError):
    """Bad input or a store that cannot be used; the message says what is wrong and what to do."""


class StoreLockedError(StoreError):
    """The store is open for writing in another live process; ``holder`` is what that process
    recorded about itself (host, pid, started, owner, command), or None if it recorded nothing."""

    def __init__(self, directory: str, holder: Optional[Dict[str, Any]]):
        self.directory = directory
        self.holder = holder
        super().__init__(_locked_message(directory, holder))

    def __reduce__(self):  # picklable (args hold the message, not the constructor's arguments)
        return self.__class__, (self.directory, self.holder)


def _locked_message(directory: str, holder: Optional[Dict[str, Any]]) -> str:
    if holder and (holder.get("pid"), holder.get("host")) == (os.getpid(), socket.gethostname()):
        return (f"the PS-KD store at {directory} is already open for writing in this process (another "
                f"TopKStore object holds its lock); close that one first, or open this one with readonly=True")
    if holder:
        who = f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}"
        if holder.get("owner"):
            who += f"; {holder['owner']}"
        who += f"; command: {holder.get('command')})"
    else:
        who = "another process (it has not recorded which yet)"
    return (f"the PS-KD store at {directory} is in use by {who}. Two training runs must not share a "
            f"store: each would train on the other's predictions as if they were its own priors. Wait "
            f"until that run has ended, or give this run its own --pskd-store-dir (a template such as "
            f"/local/scratch/pskd_{{node}} gives every run on a node the same directory: put the run's "
            f"name in it). Nothing needs cleaning up: the lock ends with the process that holds it")
