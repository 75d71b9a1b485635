"""Another Unix user, for the tests that attack the workers as one (issue 27).

A process becomes that user after it has loaded what it needs (`become_other_user()`), so it does not
need to be able to read this environment's files: it is then exactly what another local user's
process is, with its sockets owned by that user and no privilege left. Only root can do that, so the
tests that need it skip, with the reason, when not run as root.
"""

from __future__ import annotations

import os
import pwd

import pytest


def other_user() -> tuple[int, int]:
    """(uid, gid) of `nobody`, or 65534 where there is no such user."""
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(f"running as uid {os.geteuid()}: only root can act as another user (CI runs as root)")


def become_other_user() -> None:
    """Drops every privilege of this (root) process and becomes `nobody`."""
    uid, gid = other_user()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    assert os.getuid() == os.geteuid() == uid and os.getgid() == gid


# The same, as code for `python -c`, after its imports: the other user may not be able to read them.
BECOME_OTHER_USER = ("import os; os.setgroups([]); os.setgid({gid}); os.setuid({uid}); "
                     "assert os.geteuid() == {uid}").format(uid=other_user()[0], gid=other_user()[1])
