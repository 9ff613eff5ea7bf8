"""Shell completion for ``reflow-client`` and ``reflowd`` (bash, zsh, fish), via argcomplete.

argcomplete completes from the real argparse parsers, so completion never
falls out of step with the commands, and it supports all three shells (shtab
has no fish). The shell runs the command with ``_ARGCOMPLETE`` set; the
command answers from its parser (run ids come from reflowd, when one answers
within two seconds) and exits before doing anything else.
"""

from __future__ import annotations

EXECUTABLES = ("reflow-client", "reflowd")
SHELLS = ("bash", "zsh", "fish")


def script(shell: str) -> str:
    """The script that registers completion for both commands in *shell*."""
    if shell not in SHELLS:
        raise ValueError(f"no completion for shell {shell!r}; pick one of {', '.join(SHELLS)}")
    import argcomplete

    return argcomplete.shellcode(list(EXECUTABLES), shell=shell)
