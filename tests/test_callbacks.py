"""train.callbacks: import paths checked before a run starts, as one-line errors."""

from __future__ import annotations

import re

import pytest

from learnforget.config import compose, validate
from learnforget.errors import ConfigError
from learnforget.train.callbacks import call_callbacks, load_callbacks


def test_callbacks_load_and_are_called_with_the_step():
    seen = []
    fns = load_callbacks(["json.dumps", "crash_hook.die_after_step_99"])
    assert fns[0] is __import__("json").dumps
    call_callbacks([lambda **kw: seen.append(kw)], step=3, rank=0)
    assert seen == [{"step": 3, "rank": 0}]
    fns[1](step=2)  # not step 99: returns (step 99 would end this process)


@pytest.mark.parametrize(("entry", "message"), [
    ("nodots", "is not an import path (expected package.module.function)"),
    ("no_such_module_xyz.fn", "cannot be imported"),
    ("json.no_such_function", "cannot be imported"),
    ("json.__doc__", "is not callable"),
])
def test_a_bad_entry_is_one_line_naming_it(entry, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_callbacks([entry])
    assert entry in str(e.value) and "\n" not in str(e.value)


def test_the_config_must_hold_a_list_of_paths():
    validate(compose(["train.callbacks=[json.dumps]"]))
    with pytest.raises(ConfigError, match="train.callbacks must be a list"):
        validate(compose(["train.callbacks=json.dumps"]))
