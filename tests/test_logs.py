import logging

import pytest

from kidney_seg.logs import log_to


def test_log_to_writes_messages_and_tracebacks(tmp_path):
    path = tmp_path / "logs" / "rule.log"
    with pytest.raises(ValueError):
        with log_to(path):
            logging.getLogger("kidney_seg.test").info("hello from the rule")
            raise ValueError("case_00001: broken")
    text = path.read_text()
    assert "hello from the rule" in text
    assert "case_00001: broken" in text and "Traceback" in text
    root = logging.getLogger()
    assert not any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers)
