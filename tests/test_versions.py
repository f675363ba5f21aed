"""Supported transformers range and the torch -> kernel version table."""

import logging

import pytest

from qwen3_moe_patch.versions import TESTED_KERNEL_VERSIONS, check_transformers, default_kernel_version


@pytest.mark.parametrize("version", ["5.17.0", "5.20.1", "5.24.0", "5.24.0.dev0"])
def test_supported_transformers(version):
    check_transformers(version)


@pytest.mark.parametrize("version", ["4.57.1", "5.16.1", "5.25.0", "6.0.0"])
def test_unsupported_transformers_is_named(version):
    with pytest.raises(RuntimeError, match=rf"transformers {version} is not supported.*>= 5.17, < 5.25.*4.x"):
        check_transformers(version)


def test_tested_torch_gets_its_kernel_version(monkeypatch):
    monkeypatch.delenv("QWEN3_MOE_FUSED_VERSION", raising=False)
    for torch_version, kernel_version in TESTED_KERNEL_VERSIONS.items():
        assert default_kernel_version(f"{torch_version}.0+cu130") == kernel_version


def test_untested_torch_is_told_what_is_tested_and_how_to_override(monkeypatch, caplog):
    monkeypatch.delenv("QWEN3_MOE_FUSED_VERSION", raising=False)
    with caplog.at_level(logging.WARNING, logger="qwen3_moe_patch"):
        assert default_kernel_version("2.99.1") == max(TESTED_KERNEL_VERSIONS.values())
    assert "torch 2.99.1 is untested" in caplog.text and "torch 2.13 -> v1" in caplog.text
    assert "QWEN3_MOE_FUSED_VERSION" in caplog.text and "version=N" in caplog.text
    monkeypatch.setenv("QWEN3_MOE_FUSED_VERSION", "3")
    assert default_kernel_version("2.99.1") == 3
