"""What ``killswitch`` exits with; scripts and runbooks branch on these, so they never change.

0 success; 1 refused or failed; 2 bad input; 3 ``--wait`` timed out; 4 the control server
could not be reached; 5 the server answered, but its store cannot write (or be reached)
now: nothing was done.
"""

from __future__ import annotations

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_UNREACHABLE = 1, 2, 3, 4
EXIT_STORE_UNAVAILABLE = 5
EXIT_INTERRUPTED = 130
