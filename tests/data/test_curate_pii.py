"""PII scrubbing: true positives become typed placeholders; look-alikes stay untouched."""

from __future__ import annotations

import pytest

from lmstack.data.curate.document import BlockStats, Document
from lmstack.data.curate.pii import PiiConfig, luhn_valid, scrub, valid_cn_id

VALID_CN_ID = "11010519491231002X"  # the standard's published example


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("Write to jane.doe+news@example.co.uk today.", "Write to <EMAIL> today.", "EMAIL"),
        ("Call +1 415-555-0132 now.", "Call <PHONE> now.", "PHONE"),
        ("Call (415) 555-0132 now.", "Call <PHONE> now.", "PHONE"),
        ("Call +44 20 7946 0958.", "Call <PHONE>.", "PHONE"),
        ("手机号13812345678，请联系。", "手机号<PHONE>，请联系。", "PHONE"),
        ("电话 +86 138 1234 5678 。", "电话 <PHONE> 。", "PHONE"),
        ("办公室电话010-62345678，欢迎来电。", "办公室电话<PHONE>，欢迎来电。", "PHONE"),
        ("深圳分部0755-2345678转人工。", "深圳分部<PHONE>转人工。", "PHONE"),
        ("座机：（021）6234 5678", "座机：<PHONE>", "PHONE"),
        ("Tel (0571) 87654321 ext.", "Tel <PHONE> ext.", "PHONE"),
        ("总机 020 83456789-808 。", "总机 <PHONE> 。", "PHONE"),
        ("Server at 192.168.1.20 is down.", "Server at <IP_ADDRESS> is down.", "IP_ADDRESS"),
        ("IPv6 2001:db8:85a3::8a2e:370:7334 ok", "IPv6 <IP_ADDRESS> ok", "IP_ADDRESS"),
        (f"身份证号{VALID_CN_ID}。", "身份证号<CN_ID>。", "CN_ID"),
        ("Card 4111 1111 1111 1111 expires.", "Card <CREDIT_CARD> expires.", "CREDIT_CARD"),
        ("Card 5500-0000-0000-0004.", "Card <CREDIT_CARD>.", "CREDIT_CARD"),
    ],
)
def test_true_positives(text, expected, kind):
    out, counts = scrub(text)
    assert out == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "Python 3.11.7 was released in 2023-12-04.",  # version and date
        "The population grew from 1,234,567 to 2,345,678.",
        "Order number 4111111111111112 failed.",  # fails Luhn
        "ID 110105194912310021 is invalid.",  # wrong check digit
        "Version 1.2.3.4.5 of the tool.",  # not an IP: five parts
        "Values 999.1.1.1 out of range.",
        "Reference 12345678901 at 10:30:15.",  # 11 digits, not a Chinese mobile prefix
        "user at example dot com",
        "订单号07552345678已发货，共3件。",  # a bare digit run: no separator after the area code
        "2019-2023年营收增长了12%，员工1200人。",  # years and counts
        "编号010-12345678作废。",  # local numbers never start with 1
        "批次 0755-0012345 入库。",  # nor with 0
        "From 2010-2345678 records were read.",  # no leading zero: not an area code
    ],
)
def test_false_positives_left_alone(text):
    out, counts = scrub(text)
    assert out == text and counts == {}


def test_checksums():
    assert valid_cn_id(VALID_CN_ID) and not valid_cn_id("110105194912310021")
    assert luhn_valid("4111 1111 1111 1111") and not luhn_valid("4111 1111 1111 1112")


def test_block_counts_by_type_and_respects_types():
    stats = BlockStats("pii")
    block = PiiConfig().build()
    docs = [Document("mail a@b.io and c@d.org, phone 13812345678", "1"), Document("nothing here", "2")]
    out = list(block.run(docs, stats))
    assert out[0].text == "mail <EMAIL> and <EMAIL>, phone <PHONE>"
    assert stats.edits["EMAIL"] == 2 and stats.edits["PHONE"] == 1 and stats.edits["documents_changed"] == 1
    only_email = PiiConfig(types=["EMAIL"]).build()
    assert next(only_email.run([Document("a@b.io 13812345678", "3")], BlockStats("pii"))).text == (
        "<EMAIL> 13812345678"
    )


def test_unknown_type_is_a_clear_error():
    from lmstack.errors import LmstackError

    with pytest.raises(LmstackError, match="unknown"):
        PiiConfig(types=["SSN"]).build()
