"""The registry's backends satisfy the Backend protocol and declare exactly the optional ops they have."""
from __future__ import annotations

import os
import re

import pytest
import torch

from smog_kernels import backend as protocol
from smog_kernels import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = {protocol.ASSIGN_AND_STATS: protocol.FusedFirstPass, protocol.AUTOGRAD_LOSS: protocol.AutogradLoss}


@pytest.mark.parametrize("name", registry.NAMES)
def test_each_backend_satisfies_the_protocol_and_declares_its_optional_ops(name):
    backend = registry.get(name)
    if backend is None:
        pytest.skip(f"{name}: its module cannot be imported here (triton not installed)")
    assert isinstance(backend, protocol.Backend) and backend.name == name
    assert backend.capabilities <= protocol.CAPABILITIES
    assert set(OPTIONAL) == protocol.CAPABILITIES
    for capability, optional in OPTIONAL.items():
        assert (capability in backend.capabilities) == isinstance(backend, optional), (name, capability)


def test_the_reference_and_cpu_backends_are_available_here():
    assert registry.available_backends()[:2] == ["reference", "cpu"]


def test_explicit_names_are_checked():
    rows = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        registry.resolve("fast", rows)
    with pytest.raises(ValueError, match="cannot run on tensors on cpu|not available in this install"):
        registry.resolve("cuda", rows)


def test_no_code_probes_attributes_or_compares_backend_names():
    pattern = re.compile(r'getattr\((ops|backend|module)\b|name == "(reference|cpu|cuda|triton)"')
    for folder, _, files in os.walk(os.path.join(ROOT, "smog_kernels")):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(folder, file)) as f:
                    for number, line in enumerate(f, 1):
                        assert not pattern.search(line), f"{file}:{number}: {line.strip()}"
