"""Personal data becomes typed placeholders; ordinary numbers survive."""

from __future__ import annotations

import pytest

from pipeline.dataset.redact import luhn_valid, redact, redact_found, redact_values, valid_id_number

# A valid ID number (checksum and birth date) and a valid bank card (Luhn), both made up.
ID_NUMBER = "11010519491231002X"
CARD = "6222021234567890128"


def test_reference_numbers_are_valid():
    assert valid_id_number(ID_NUMBER)
    assert luhn_valid(CARD)


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("我手机13812345678有事打我", "我手机<手机号>有事打我", "phone"),
        ("电话 +86 138 1234 5678", "电话 <手机号>", "phone"),
        ("打 0755-26881234 转 8", "打 <电话> 转 8", "landline"),
        ("座机(010)62345678", "座机<电话>", "landline"),
        (f"身份证{ID_NUMBER}别外传", "身份证<身份证号>别外传", "id_number"),
        (f"卡号 {CARD}", "卡号 <银行卡号>", "bank_card"),
        ("卡号 6222 0212 3456 7890 128", "卡号 <银行卡号>", "bank_card"),
        ("发到 xiao.wang+qq@example.com 就行", "发到 <邮箱> 就行", "email"),
        ("我QQ号：123456789", "我QQ号：<QQ号>", "qq"),
        ("加我qq:987654321", "加我qq:<QQ号>", "qq"),
        ("扣扣是 55667788", "扣扣是 <QQ号>", "qq"),
        ("看这个https://b23.tv/abc?x=1哈哈", "看这个<链接>哈哈", "url"),
        ("www.example.com/page 上有", "<链接> 上有", "url"),
        ("去 github.com/foo/bar 看", "去 <链接> 看", "url"),
    ],
)
def test_personal_data_is_replaced_by_typed_placeholders(text, expected, kind):
    redacted, counts = redact(text)
    assert redacted == expected
    assert counts == {kind: 1}


@pytest.mark.parametrize(
    "text",
    [
        "明天 2024-03-15 14:30 见",
        "2024年3月15日下午3点",
        "20240315 的订单",
        "这个 ¥1399.00，打完折 899 元",
        "一共 12 单，3 单退了",
        "23333333 笑死",
        "520 快乐",
        "6666666",
        "时间戳 1700000000 和 1700000000123",
        "第 10086 条",
        "比分 3:2",
        "版本 v1.2.3",
        "房间号 8808",
        "11010519491231002 少一位",
        "110105194912310021 校验位不对",
        "6222021234567890123 不过 Luhn",
        "1234567890123456",
        "qq 上说",
        "[图片][doge] 哈哈",
    ],
)
def test_dates_times_prices_and_chat_numbers_survive(text):
    redacted, counts = redact(text)
    assert redacted == text
    assert not counts


def test_names_from_a_list_are_redacted_longest_first():
    redacted, counts = redact("王小明和王小说今天来了", names=["王小", "王小明"])
    assert redacted == "<姓名>和<姓名>说今天来了"
    assert counts == {"name": 2}


def test_counts_add_up_per_type():
    _, counts = redact("13812345678 或 13912345678，邮箱 a@b.cn")
    assert counts == {"phone": 2, "email": 1}


def test_a_value_found_in_context_is_caught_again_where_it_recurs_bare():
    _, _, found = redact_found("我QQ号：31415926")
    assert found == {"31415926": "<QQ号>"}
    assert redact_values("好 31415926 加了", found) == ("好 <QQ号> 加了", {"qq": 1})
    assert redact_values("314159260 不是它", found) == ("314159260 不是它", {})
