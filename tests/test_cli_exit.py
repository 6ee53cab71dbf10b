"""The command's exit: the process skips the collection of its garbage, a caller's does not."""

import gc
import sys

from tlfinetune.cli import main


def test_only_the_command_itself_freezes_the_garbage_collector(monkeypatch, capsys):
    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    main(["backbones"])  # a caller in its own process (tests, a notebook): gc left alone
    assert frozen == []
    monkeypatch.setattr(sys, "argv", ["tlfinetune", "backbones"])
    main()  # `python -m tlfinetune backbones`: the process ends after this
    assert frozen == [True]
    assert "vgg16" in capsys.readouterr().out
