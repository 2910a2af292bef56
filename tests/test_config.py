"""snnconv.config: each environment variable declared once, read at use, overridden by Context per thread."""

import threading
from pathlib import Path

import pytest

from snnconv import config
from snnconv.runtime import integer_spikes as int8


def test_readme_lists_every_setting():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for env in config.ALL:
        assert f"| `{env.name}` |" in readme, env.name


def test_environment_then_context_then_back(monkeypatch):
    monkeypatch.delenv(config.INT8.name, raising=False)
    assert config.INT8.get() == "auto"
    monkeypatch.setenv(config.INT8.name, "  off ")
    assert config.INT8.get() == "off" and config.INT8.off()
    assert int8.mode() is None  # the runtime reads the same declaration
    with config.Context(SNNCONV_INT8="binary-emulated"):
        assert config.INT8.get() == "binary-emulated" and int8.mode() == "binary-emulated"
        with config.Context(SNNCONV_INT8="vnni-emulated"):
            assert int8.mode() == "vnni-emulated"
        assert int8.mode() == "binary-emulated"
    assert config.INT8.get() == "off"


def test_context_stays_in_its_thread(monkeypatch):
    monkeypatch.delenv(config.INT8.name, raising=False)
    seen = []
    with config.Context(SNNCONV_INT8="off"):
        worker = threading.Thread(target=lambda: seen.append(config.INT8.get()))
        worker.start()
        worker.join()
        assert config.INT8.get() == "off"
    assert seen == ["auto"]


def test_unknown_setting_refused():
    with pytest.raises(KeyError, match="SNNCONV_INT9"), config.Context(SNNCONV_INT9="off"):
        pass
