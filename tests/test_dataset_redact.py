"""Personal data becomes typed placeholders; ordinary numbers survive."""

from __future__ import annotations

import re

import pytest

from pipeline.dataset import redact as redact_module
from pipeline.dataset.redact import (
    KINDS,
    luhn_valid,
    needs_redaction,
    redact,
    redact_found,
    redact_values,
    valid_id_number,
)

# A valid ID number (checksum and birth date) and a valid bank card (Luhn), both made up.
ID_NUMBER = "11010519491231002X"
CARD = "6222021234567890128"

# (text, redacted text, kind counted once)
PLAIN_FORMS = [
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
]
MENTIONS = [
    ("@123456789 你看", "@<QQ号> 你看", "qq"),
    ("你好@2233445566", "你好@<QQ号>", "qq"),
]
QQ_SPELLINGS = [
    ("QQ: 1234 5678 9", "QQ: <QQ号>", "qq"),
    ("QQ号 123-456-789", "QQ号 <QQ号>", "qq"),
    ("扣扣：12 345 6789", "扣扣：<QQ号>", "qq"),
    ("ＱＱ：１２３４５６７８９", "ＱＱ：<QQ号>", "qq"),
    ("Q号 31415926", "Q号 <QQ号>", "qq"),
    ("q号:31415926", "q号:<QQ号>", "qq"),
    ("Q：31415926", "Q：<QQ号>", "qq"),
    ("企鹅号 31415926", "企鹅号 <QQ号>", "qq"),
    ("QQ号码为31415926", "QQ号码为<QQ号>", "qq"),
    ("加Q 31415926", "加Q <QQ号>", "qq"),
    ("我的QQ 12345678 3点上线", "我的QQ <QQ号> 3点上线", "qq"),
    ("加我 31415926", "加我 <QQ号>", "qq"),
    ("加我好友：31415926 验证写名字", "加我好友：<QQ号> 验证写名字", "qq"),
]
FULL_WIDTH = [
    ("我手机１３８００１３８０００", "我手机<手机号>", "phone"),
    ("身份证１１０１０５１９４９１２３１００２Ｘ", "身份证<身份证号>", "id_number"),
    ("卡号６２２２０２１２３４５６７８９０１２８", "卡号<银行卡号>", "bank_card"),
    ("打１３８－００１３－８０００", "打<手机号>", "phone"),
]
PHONE_SPELLINGS = [
    ("138.0013.8000 找我", "<手机号> 找我", "phone"),
    ("+86 138.0013.8000", "<手机号>", "phone"),
    ("138 0013 8000", "<手机号>", "phone"),
    ("138-0013-8000", "<手机号>", "phone"),
    ("(+86)138 0013 8000", "<手机号>", "phone"),
    ("手机：1380 013 8000", "手机：<手机号>", "phone"),
    ("电话 138-00-138-000", "电话 <手机号>", "phone"),
    ("tel: 138 0013 8000", "tel: <手机号>", "phone"),
    ("联系方式 138.00.138.000", "联系方式 <手机号>", "phone"),
    ("座机 010 6234 5678", "座机 <电话>", "landline"),
    ("打 010-6234-5678", "打 <电话>", "landline"),
]
SPACED_IDS = [
    ("身份证 110105 19491231 002X", "身份证 <身份证号>", "id_number"),
    ("身份证 110105 1949 1231 002X", "身份证 <身份证号>", "id_number"),
    ("身份证 110105-1949-1231-002X", "身份证 <身份证号>", "id_number"),
    ("110101 19900307 7774", "<身份证号>", "id_number"),
]
WECHAT = [
    ("微信：abc_123", "微信：<微信号>", "wechat"),
    ("微信号 zhangsan", "微信号 <微信号>", "wechat"),
    ("我微信是 zhangsan 加一下", "我微信是 <微信号> 加一下", "wechat"),
    ("加我vx zhangsan", "加我vx <微信号>", "wechat"),
    ("加v zhangsan", "加v <微信号>", "wechat"),
    ("加个V：zhangsan", "加个V：<微信号>", "wechat"),
    ("VX: wang_xiao", "VX: <微信号>", "wechat"),
    ("wx：wangxiao", "wx：<微信号>", "wechat"),
    ("vx abc123", "vx <微信号>", "wechat"),
    ("v信 wangxiao88", "v信 <微信号>", "wechat"),
    ("威信是wangxiao", "威信是<微信号>", "wechat"),
    ("薇信 wx-8888", "薇信 <微信号>", "wechat"),
    ("weixin: zhangsan", "weixin: <微信号>", "wechat"),
    ("WeChat ID: zhang_san", "WeChat ID: <微信号>", "wechat"),
    ("微信号：123456789", "微信号：<微信号>", "wechat"),
    ("ｖｘ：ｚｈａｎｇｓａｎ", "ｖｘ：<微信号>", "wechat"),
    ("扫这个 wxid_abcdef123456", "扫这个 <微信号>", "wechat"),
    ("微信 13800138000", "微信 <手机号>", "phone"),
]
POSITIVES = PLAIN_FORMS + MENTIONS + QQ_SPELLINGS + FULL_WIDTH + PHONE_SPELLINGS + SPACED_IDS + WECHAT

NEGATIVES = [
    "明天 2024-03-15 14:30 见",
    "2024-05-01",
    "2024.05.01 出发",
    "2024/05/01",
    "2024年3月15日下午3点",
    "20240315 的订单",
    "时间 14:30:05",
    "这个 ¥1399.00，打完折 899 元",
    "¥1380.00",
    "一共 12 单，3 单退了",
    "23333333 笑死",
    "23333",
    "520 快乐",
    "6666666",
    "666666",
    "时间戳 1700000000 和 1700000000123",
    "第 10086 条",
    "比分 3:2",
    "版本 v1.2.3",
    "微信 8.0.50 更新了",
    "房间号 8808",
    "11010519491231002 少一位",
    "110105194912310021 校验位不对",
    "110105 1949 1231 0021 校验位不对",
    "6222021234567890123 不过 Luhn",
    "1234567890123456",
    "3.14159265358",
    "IP 192.168.1.100",
    "qq 上说",
    "QQ号 2024-05-01 注册的",
    "Q1: 12345 个",
    "FAQ: 12345",
    "加我 666666",
    "加我 100000 分",
    "加我 20240501 那天",
    "电话费 138.00 元",
    "我相信 123456",
    "@全体成员 12345 个人",
    "[图片][doge] 哈哈",
]
WECHAT_NEGATIVES = [
    "微信 really nice",
    "vx zhangsan",
    "微信支付 200",
    "vx 聊",
    "wx.login() 报错",
    "wxid_ 是什么",
    "加微信了吗",
    "devx: abc123",
    "Nov 2024",
    "版本v: abc123",
]


@pytest.mark.parametrize(("text", "expected", "kind"), PLAIN_FORMS)
def test_personal_data_is_replaced_by_typed_placeholders(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize(("text", "expected", "kind"), MENTIONS)
def test_mentions_of_unknown_people_keep_the_at_and_lose_the_qq_number(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize(("text", "expected", "kind"), QQ_SPELLINGS)
def test_qq_numbers_after_a_label_are_caught_however_they_are_spelled(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize(("text", "expected", "kind"), FULL_WIDTH)
def test_full_width_digits_are_matched_and_their_original_span_replaced(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize(("text", "expected", "kind"), PHONE_SPELLINGS)
def test_phone_numbers_are_caught_with_dots_spaces_dashes_and_after_a_label(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize(("text", "expected", "kind"), SPACED_IDS)
def test_id_numbers_written_in_groups_are_caught_when_checksum_and_birth_date_hold(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize(("text", "expected", "kind"), WECHAT)
def test_wechat_ids_after_a_label_are_replaced_and_the_label_kept(text, expected, kind):
    assert redact(text) == (expected, {kind: 1})


@pytest.mark.parametrize("text", NEGATIVES)
def test_dates_times_prices_versions_and_chat_numbers_survive(text):
    assert redact(text) == (text, {})


@pytest.mark.parametrize("text", WECHAT_NEGATIVES)
def test_a_bare_wechat_label_takes_only_ids_with_a_digit_and_only_as_a_whole_word(text):
    assert redact(text) == (text, {})


@pytest.mark.parametrize("text", [t for t, _, _ in POSITIVES] + NEGATIVES + WECHAT_NEGATIVES)
def test_needs_redaction_opens_whenever_redact_found_would_change_the_text(text):
    redacted, counts, found = redact_found(text)
    if redacted != text or counts or found:
        assert needs_redaction(text)


def test_needs_redaction_stays_closed_for_plain_chat():
    for text in ("哈哈哈", "我相信你", "明天 3 点见", "520 快乐", "xswl", "收到，谢谢！"):
        assert not needs_redaction(text), text


def test_names_from_a_list_are_redacted_longest_first():
    redacted, counts = redact("王小明和王小说今天来了", names=["王小", "王小明"])
    assert redacted == "<姓名>和<姓名>说今天来了"
    assert counts == {"name": 2}


def test_counts_add_up_per_type():
    _, counts = redact("13812345678 或 13912345678，邮箱 a@b.cn，微信号 zhangsan")
    assert counts == {"phone": 2, "email": 1, "wechat": 1}


def test_reference_numbers_are_valid():
    assert valid_id_number(ID_NUMBER)
    assert luhn_valid(CARD)


def test_every_placeholder_has_a_report_kind():
    placeholders = {
        value
        for name, value in vars(redact_module).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"<.+>", value)
    }
    assert placeholders == set(KINDS)
    assert KINDS[redact_module.WECHAT] == "wechat"


def test_a_value_found_in_context_is_caught_again_where_it_recurs_bare():
    _, _, found = redact_found("我QQ号：31415926")
    assert found == {"31415926": "<QQ号>"}
    assert redact_values("好 31415926 加了", found) == ("好 <QQ号> 加了", {"qq": 1})
    assert redact_values("314159260 不是它", found) == ("314159260 不是它", {})


def test_a_qq_number_written_in_groups_is_remembered_as_written_and_as_digits():
    _, _, found = redact_found("QQ: 1234 5678 9")
    assert found == {"1234 5678 9": "<QQ号>", "123456789": "<QQ号>"}
    assert redact_values("就是 123456789 啊", found) == ("就是 <QQ号> 啊", {"qq": 1})
    assert redact_values("再说一遍 1234 5678 9", found) == ("再说一遍 <QQ号>", {"qq": 1})


def test_a_full_width_repetition_of_a_found_value_is_caught_in_its_original_characters():
    _, _, found = redact_found("ＱＱ：１２３４５６７８９")
    assert found == {"123456789": "<QQ号>"}
    assert redact_values("好 １２３４５６７８９ 加了", found) == ("好 <QQ号> 加了", {"qq": 1})


def test_a_mentioned_qq_number_is_caught_again_where_it_recurs_bare():
    _, _, found = redact_found("@123456789 你看")
    assert redact_values("123456789 是谁", found) == ("<QQ号> 是谁", {"qq": 1})


def test_a_wechat_id_is_caught_again_where_it_recurs_bare():
    _, _, found = redact_found("微信号：zhang_san")
    assert found == {"zhang_san": "<微信号>"}
    assert redact_values("搜 zhang_san 就行", found) == ("搜 <微信号> 就行", {"wechat": 1})


def test_a_qq_mail_address_gives_away_the_qq_number_for_later_lines():
    redacted, counts, found = redact_found("邮箱 31415926@qq.com")
    assert (redacted, counts) == ("邮箱 <邮箱>", {"email": 1})
    assert redact_values("加 31415926", found) == ("加 <QQ号>", {"qq": 1})


def test_a_mention_carrying_a_qq_nt_uid_is_redacted_like_a_number() -> None:
    text, counts = redact("@u_3nMb9XqLk2Pz_w 你看这个")
    assert text == "@<QQ号> 你看这个" and counts["qq"] == 1
