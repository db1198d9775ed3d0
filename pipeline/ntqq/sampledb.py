"""A synthetic but format-faithful QQ NT `nt_msg.db`, for the demo, the tests and the benchmark.

The file is what QQ NT writes: a 1024-byte plaintext header, then SQLCipher 4 with QQ's
parameters, numeric column names and protobuf bodies (docs/ntqq.md). The owner has a
recognisable style (catchphrases, short replies, favourite stickers) so that a model
fine-tuned on the history visibly picks it up. Deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import string
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlcipher3

from pipeline.files import PRIVATE_DIR_MODE, atomic_path
from pipeline.ntqq import body as B
from pipeline.ntqq import ntqq_body_pb2
from pipeline.ntqq.decrypt import (
    PAGE_SIZE,
    QQ_HEADER_MAGIC,
    QQ_HEADER_SIZE,
    QQ_MAGIC,
    QQ_MAGIC_OFFSET,
    apply_qq_cipher,
)
from pipeline.ntqq.keys import android_key

SAMPLE_KEY = "qqtwin-sample-01"  # 16 printable characters, like a real desktop key
OWNER_UIN = "2233445566"
OWNER_UID = "u_OwnerXiaolinQQTwin0001"
OWNER_NAME = "小林"
OWNER_CATCHPHRASES: tuple[str, ...] = ("笑死", "绝了", "好耶", "哈哈哈哈")
# As rendered by pipeline.chatformat: a market sticker and two QQ faces.
OWNER_STICKERS: tuple[str, ...] = ("[贴贴]", "[doge]", "[捂脸]")

# Message types (40011), send types (40013), send status (40041).
MSG_NORMAL, MSG_EMPTY, MSG_GRAY_TIP, MSG_REPLY = 2, 1, 5, 9
SEND_RECEIVED, SEND_SELF, SEND_SELF_OTHER_DEVICE, SEND_SYSTEM = 0, 1, 2, 3
STATUS_DELIVERED, STATUS_FAILED = 2, 3
CHAT_C2C, CHAT_GROUP = 1, 2

# The message tables' columns; those qq-twin does not read are filler of realistic width,
# so the benchmark's floor reads rows as wide as QQ's.
MSG_COLUMNS: tuple[str, ...] = (
    "40001", "40002", "40003", "40010", "40011", "40012", "40013", "40020", "40021", "40026",
    "40027", "40030", "40033", "40040", "40041", "40050", "40052", "40058", "40090", "40093",
    "40100", "40800", "40850", "40900",
)  # fmt: skip
_COLUMN_TYPES = {
    "40020": "TEXT",
    "40021": "TEXT",
    "40090": "TEXT",
    "40093": "TEXT",
    "40800": "BLOB",
    "40900": "BLOB",
}
UID_MAP_COLUMNS: tuple[str, ...] = ("48901", "48902", "48912", "1002")  # row id, uid, flags, uin

_START = 1735660800  # 2025-01-01 00:00 +08:00
_SPAN_DAYS = 180


# ---------------------------------------------------------------- element builders


def text(value: str) -> dict:
    return {"element_type": B.TEXT, "sub_type": 0, "text": value}


def at(name: str, uid: str) -> dict:
    return {"element_type": B.TEXT, "sub_type": B.AT_ONE, "text": f"@{name}", "at_uid": uid}


def at_all() -> dict:
    return {"element_type": B.TEXT, "sub_type": B.AT_ALL, "text": "@全体成员"}


def face(face_id: int, face_text: str | None = None) -> dict:
    element: dict = {"element_type": B.FACE, "face_id": face_id}
    if face_text is not None:
        element["face_text"] = face_text
    return element


def sticker(value: str) -> dict:
    return {"element_type": B.MARKET_STICKER, "sticker_text": value}


def image(summary: str = "") -> dict:
    element: dict = {"element_type": B.IMAGE}
    if summary:
        element["image_summary"] = summary
    return element


def voice(transcript: str = "") -> dict:
    element: dict = {"element_type": B.VOICE}
    if transcript:
        element["voice_text"] = transcript
    return element


def video() -> dict:
    return {"element_type": B.VIDEO}


def file() -> dict:
    return {"element_type": B.FILE}


def forward() -> dict:
    return {"element_type": B.FORWARD}


def ark_card() -> dict:
    return {"element_type": B.ARK}


def reply(seq: int, sender_uin: int = 0, quoted: str = "") -> dict:
    element: dict = {"element_type": B.REPLY, "reply_seq": seq}
    if sender_uin:
        element["reply_sender_uin"] = sender_uin
    if quoted:
        element["reply_text"] = quoted.encode()
    return element


def gray_tip(message: str = "") -> dict:
    element: dict = {"element_type": B.GRAY_TIP}
    if message:
        element["text"] = message
    return element


def revoke(operator_uid: str, suggestion: str = "撤回了一条消息") -> dict:
    return {"element_type": B.GRAY_TIP, "revoke_operator_uid": operator_uid, "revoke_suggestion": suggestion}


def encode_body(elements: Iterable[dict], first_id: int = 1) -> bytes:
    """Serialise element dicts (the builders above) into a column-40800 body."""
    body = ntqq_body_pb2.MsgBody()
    for number, element in enumerate(elements, start=first_id):
        fields = {k: v.encode() if isinstance(v, str) else v for k, v in element.items()}
        body.elements.add(element_id=number, **fields)
    return body.SerializeToString()


# Malformed bodies, as seen in damaged or future-format files.
def truncated_body(elements: Iterable[dict]) -> bytes:
    data = encode_body(elements)
    return data[: max(1, len(data) - 3)]


def wrong_wire_type_body() -> bytes:
    # Field 40800 as a varint instead of a length-delimited element list.
    return bytes([0x80, 0xF6, 0x13, 0x05])


# ---------------------------------------------------------------- rows


@dataclass(slots=True)
class SampleRow:
    """One row of c2c_msg_table / group_msg_table, before encoding."""

    msg_id: int
    chat_type: int  # CHAT_C2C or CHAT_GROUP
    peer: int  # peer uin (c2c) or group code
    peer_uid: str  # peer uid (c2c) or group code as text
    sender_uin: int  # 0 when QQ stored only the uid
    sender_uid: str
    send_type: int
    time: int
    seq: int
    elements: list[dict] = field(default_factory=list)
    body: bytes | None = None  # overrides `elements` (malformed bodies)
    msg_type: int = MSG_NORMAL
    status: int = STATUS_DELIVERED
    card: str = ""
    nick: str = ""
    reply_seq: int = 0  # column 40850

    def encoded_body(self) -> bytes:
        # QQ gives every element a large unique id, so bodies of equal text still differ.
        element_id = (self.msg_id ^ 0x2B5A_5A5A) & 0x7FFF_FFFF_FFFF_FFFF
        return self.body if self.body is not None else encode_body(self.elements, element_id)


@dataclass(slots=True, frozen=True)
class Person:
    uin: int
    uid: str
    nick: str
    card: str = ""


# ---------------------------------------------------------------- the synthetic history

_FRIEND_NICKS = (
    "阿杰",
    "小雨",
    "老李",
    "豆豆",
    "橙子",
    "大壮",
    "糖糖",
    "阿宁",
    "小周",
    "木木",
    "七七",
    "老猫",
)
_GROUPS = (("软工2班", 4), ("周末羽毛球", 5), ("家里人", 3))
_STRANGER_NICKS = ("路人甲", "momo", "风起", "一只鱼", "Leo", "阿珂", "奶茶续命", "不吃香菜")

_FOODS = ("火锅", "麻辣烫", "烧烤", "奶茶", "螺蛳粉", "炸鸡", "饺子", "寿司", "煎饼果子", "酸菜鱼")
_PLACES = ("图书馆", "商场", "公园", "食堂", "电影院", "体育馆", "咖啡店", "江边", "地铁站", "夜市")
_THINGS = ("作业", "周报", "PPT", "实验报告", "论文", "简历", "报销单", "课设", "读书笔记", "方案")
_SHOWS = ("新番", "那个综艺", "流浪地球", "庆余年", "足球赛", "演唱会直播", "纪录片", "脱口秀")
_GAMES = ("王者", "原神", "蛋仔", "金铲铲", "我的世界", "星露谷")
_TIMES = ("七点", "八点半", "十点", "下午三点", "晚上九点", "中午")

_FRIEND_TEMPLATES = (
    "中午吃{food}吗", "我刚点了{food}", "{food}是真的好吃", "楼下新开了家{food}店", "晚上一起去吃{food}？",
    "周末去{place}吗", "明天{time}在{place}见？", "我在{place}了，你到哪了",
    "{place}人好多啊", "今天去了趟{place}",
    "{thing}写完了吗", "我的{thing}还没弄完", "{thing}明天就要交了", "你{thing}弄好没", "又要交{thing}了",
    "你看{show}了吗", "{show}也太好看了吧", "今晚开黑吗，{game}", "{game}更新了", "昨晚{game}连跪五把",
    "今天好热啊", "下雨了记得带伞", "我猫今天把杯子打碎了", "刚睡醒", "好困啊，不想上班", "明天放假吗",
    "你在干嘛", "到家了没", "借我充电宝用一下", "我又胖了两斤", "这周过得好快", "下周要出差",
    "老板又开会了", "今天加班到{time}", "地铁上好挤", "我买了新耳机", "你生日想要什么", "猜猜我在哪",
)  # fmt: skip
_FRIEND_FOLLOWUPS = (
    "真的", "你说呢", "就是说啊", "那我先去了", "好的", "行吧", "等我一下", "嗯嗯", "我也觉得",
    "哈哈", "那就这么定了", "你来不来", "算了算了", "有道理", "不会吧", "明天再说",
)  # fmt: skip
_OWNER_CORES = (
    "真的假的", "冲", "可以啊", "我也想去", "在路上了", "还没", "明天吧", "行", "不了不了", "我来了",
    "离谱", "好好好", "救命", "稳了", "安排", "我不信", "太真实了", "等我", "马上", "收到",
    "我也是", "那必须的", "啊这", "懂了", "没问题", "我请客", "下次一定", "羡慕", "可以可以", "走起",
)  # fmt: skip
_FRIEND_FACES = (
    (14, "/微笑"),
    (13, "/呲牙"),
    (20, "/偷笑"),
    (76, "/赞"),
    (271, "/吃瓜"),
    (182, "/笑哭"),
    (32, None),
)
_GROUP_TIPS = ("{name} 加入了群聊", "{name} 修改了群名称", "群主开启了全员禁言", "{name} 拍了拍 {other}")


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        food=rng.choice(_FOODS),
        place=rng.choice(_PLACES),
        thing=rng.choice(_THINGS),
        show=rng.choice(_SHOWS),
        game=rng.choice(_GAMES),
        time=rng.choice(_TIMES),
    )


def _uid(rng: random.Random) -> str:
    return "u_" + "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(22))


def owner_reply_elements(rng: random.Random) -> list[dict]:
    """One of the owner's replies: short, often a catchphrase, often a favourite sticker."""
    roll = rng.random()
    if roll < 0.08:  # a sticker on its own
        return [_owner_sticker(rng)]
    words = rng.choice(_OWNER_CORES)
    if rng.random() < 0.58:
        phrase = rng.choice(OWNER_CATCHPHRASES)
        words = f"{phrase} {words}" if rng.random() < 0.6 else f"{words}{phrase}"
    elements = [text(words)]
    if rng.random() < 0.35:
        elements.append(_owner_sticker(rng))
    return elements


def _owner_sticker(rng: random.Random) -> dict:
    choice = rng.choices(OWNER_STICKERS, weights=(5, 3, 2))[0]
    if choice == "[贴贴]":
        return sticker("[贴贴]")
    return face(179, "/doge") if choice == "[doge]" else face(264, "/捂脸")


class _History:
    """Builds the synthetic history session by session (see `sessions`)."""

    def __init__(self, seed: int, messages: int) -> None:
        self.rng = random.Random(seed)
        # Sessions start in time order, spread over the whole span (about 11 rows each), and
        # never overlap within one chat: sequence numbers then grow with time, as in QQ.
        self.mean_gap = _SPAN_DAYS * 86400 / max(1.0, messages / 11)
        self.busy_until: dict[tuple[int, int], int] = {}
        rng = self.rng
        self.owner = Person(int(OWNER_UIN), OWNER_UID, OWNER_NAME)
        self.friends = [
            Person(rng.randrange(100_000_000, 3_999_999_999), _uid(rng), nick) for nick in _FRIEND_NICKS
        ]
        self.groups: list[tuple[int, list[Person]]] = []
        for name, n_friends in _GROUPS:
            code = rng.randrange(100_000_000, 999_999_999)
            members = [
                Person(p.uin, p.uid, p.nick, card=rng.choice(("", f"{p.nick}-{name[:2]}", p.nick + "同学")))
                for p in rng.sample(self.friends, n_friends)
            ]
            for nick in rng.sample(_STRANGER_NICKS, 3):
                members.append(Person(rng.randrange(100_000_000, 3_999_999_999), _uid(rng), nick, card=""))
            self.groups.append((code, members))
        # A few members QQ stored by uid only: the uin comes from nt_uid_mapping_table.
        self.uid_only = {self.groups[0][1][-1].uid, self.groups[1][1][-1].uid}
        self.seq: dict[tuple[int, int], int] = {}
        self.counter = 0

    def uid_map(self) -> dict[str, int]:
        people = [self.owner, *self.friends, *(m for _, members in self.groups for m in members)]
        return {p.uid: p.uin for p in people}

    def _row(self, chat_type: int, peer: int, peer_uid: str, sender: Person, t: int, **kw) -> SampleRow:
        self.counter += 1
        key = (chat_type, peer)
        self.seq[key] = self.seq.get(key, 0) + 1
        is_owner = sender.uin == self.owner.uin
        send_type = kw.pop("send_type", SEND_SELF if is_owner else SEND_RECEIVED)
        if is_owner and send_type == SEND_SELF and self.rng.random() < 0.1:
            send_type = SEND_SELF_OTHER_DEVICE
        sender_uin = 0 if sender.uid in self.uid_only else sender.uin
        return SampleRow(
            msg_id=(t << 32) | (self.counter & 0xFFFFFFFF),
            chat_type=chat_type,
            peer=peer,
            peer_uid=peer_uid,
            sender_uin=sender_uin,
            sender_uid=sender.uid,
            send_type=send_type,
            time=t,
            seq=self.seq[key],
            card=sender.card if chat_type == CHAT_GROUP else "",
            nick=sender.nick,
            **kw,
        )

    def _friend_elements(self, speaker: Person, group: bool, members: Sequence[Person]) -> list[dict]:
        rng = self.rng
        roll = rng.random()
        sentence = _fill(rng.choice(_FRIEND_TEMPLATES), rng)
        if roll < 0.07:
            return [image()]
        if roll < 0.10:
            return [image("[动画表情]")]
        if roll < 0.12:
            return [voice(sentence if rng.random() < 0.5 else "")]
        if roll < 0.13:
            return [video()]
        if roll < 0.14:
            return [file()]
        if roll < 0.15:
            return [forward()]
        if roll < 0.16:
            return [ark_card()]
        elements = [text(sentence)]
        if group and rng.random() < 0.12:
            target = self.owner if rng.random() < 0.7 else rng.choice(members)
            elements = [at(target.card or target.nick, target.uid), text(" " + sentence)]
        if group and rng.random() < 0.01:
            elements = [at_all(), text(" " + sentence)]
        if rng.random() < 0.12:
            face_id, face_text = rng.choice(_FRIEND_FACES)
            elements.append(face(face_id, face_text))
        if rng.random() < 0.05:
            elements.append(image())
        return elements

    def sessions(self) -> Iterator[list[SampleRow]]:
        """Endless conversation sessions, each a list of rows in time order."""
        rng = self.rng
        start = float(_START)
        while True:
            start += rng.expovariate(1 / self.mean_gap)
            t = int(start)
            group = rng.random() < 0.35
            if group:
                code, members = rng.choice(self.groups)
                chat_type, peer, peer_uid = CHAT_GROUP, code, str(code)
                speakers = rng.sample(members, min(len(members), rng.randint(1, 3)))
            else:
                friend = rng.choice(self.friends)
                chat_type, peer, peer_uid, members = CHAT_C2C, friend.uin, friend.uid, [friend]
                speakers = [friend]
            t = max(t, self.busy_until.get((chat_type, peer), 0) + 600)
            rows: list[SampleRow] = []
            last_friend_seq = 0
            for _ in range(rng.randint(2, 6)):
                for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
                    speaker = rng.choice(speakers)
                    t += rng.randint(3, 90)
                    elements = self._friend_elements(speaker, group, members)
                    if rows and rng.random() < 0.3:
                        elements = [text(rng.choice(_FRIEND_FOLLOWUPS))]
                    row = self._row(chat_type, peer, peer_uid, speaker, t, elements=elements)
                    rows.append(row)
                    last_friend_seq = row.seq
                    rows.extend(self._noise(chat_type, peer, peer_uid, speaker, members, t))
                if group and rng.random() < 0.3:
                    continue  # in groups the owner often just reads
                for _ in range(rng.choices((1, 2), weights=(7, 3))[0]):
                    t += rng.randint(2, 60)
                    elements = owner_reply_elements(rng)
                    reply_seq = 0
                    if group and rng.random() < 0.15:
                        reply_seq = last_friend_seq
                        elements = [reply(reply_seq), *elements]
                    status = STATUS_FAILED if rng.random() < 0.01 else STATUS_DELIVERED
                    row = self._row(
                        chat_type,
                        peer,
                        peer_uid,
                        self.owner,
                        t,
                        elements=elements,
                        reply_seq=reply_seq,
                        status=status,
                        msg_type=MSG_REPLY if reply_seq else MSG_NORMAL,
                    )
                    rows.append(row)
            self.busy_until[(chat_type, peer)] = t + 5
            yield rows

    def _noise(self, chat_type: int, peer: int, peer_uid: str, speaker: Person, members, t: int):
        """Rows that are not messages: revokes, gray tips, system rows."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.015:
            yield self._row(
                chat_type,
                peer,
                peer_uid,
                speaker,
                t + 1,
                msg_type=MSG_GRAY_TIP,
                elements=[revoke(speaker.uid)],
            )
        elif roll < 0.025 and chat_type == CHAT_GROUP:
            tip = rng.choice(_GROUP_TIPS).format(name=speaker.nick, other=rng.choice(members).nick)
            yield self._row(
                chat_type, peer, peer_uid, speaker, t + 1, msg_type=MSG_GRAY_TIP, elements=[gray_tip(tip)]
            )
        elif roll < 0.03:
            yield self._row(
                chat_type,
                peer,
                peer_uid,
                speaker,
                t + 1,
                send_type=SEND_SYSTEM,
                elements=[text("你们已成为好友")],
            )


def generate_history(messages: int, seed: int = 0) -> tuple[list[SampleRow], dict[str, int]]:
    """`messages` rows of synthetic history (time-ordered) and the uid → uin map."""
    history = _History(seed, messages)
    rows: list[SampleRow] = []
    for session in history.sessions():
        rows.extend(session)
        if len(rows) >= messages:
            break
    rows = rows[:messages]
    rows.sort(key=lambda r: (r.time, r.msg_id))
    return rows, history.uid_map()


# ---------------------------------------------------------------- writing the file


def make_header(hmac: str, rand: str) -> bytes:
    """A QQ NT style 1024-byte plaintext header naming the HMAC and carrying `rand`."""
    tail = b"\x12" + bytes([len(rand)]) + rand.encode() + b"\x1a" + bytes([len(hmac)]) + hmac.encode()
    head = QQ_HEADER_MAGIC.ljust(QQ_MAGIC_OFFSET, b"\x00") + QQ_MAGIC + len(tail).to_bytes(4, "little") + tail
    return head.ljust(QQ_HEADER_SIZE, b"\x00")


def sample_rand(seed: int) -> str:
    """The header's `rand` for a seed (8 alphanumerics, as Android QQ writes)."""
    return hashlib.sha256(f"qq-twin-rand-{seed}".encode()).hexdigest()[:8]


def write_sample_db(
    out_dir: Path,
    *,
    key: str | None = SAMPLE_KEY,
    messages: int = 3000,
    seed: int = 0,
    hmac: str = "HMAC_SHA1",
    header: bool = True,
    rows: Sequence[SampleRow] | None = None,
    wal_rows: Sequence[SampleRow] = (),
    wal_messages: int = 0,
    malformed: int = 0,
    uid_map: dict[str, int] | None = None,
    android_uid: str | None = None,
) -> Path:
    """Write `out_dir/nt_msg.db` (and `nt_msg.db-wal` when WAL rows are asked for).

    `rows` replaces the generated history (tests build exact rows); `wal_rows` /
    `wal_messages` (the last N generated rows) stay un-checkpointed in the `-wal` file;
    `malformed` damages that many bodies; `key=None` writes a plain SQLite file;
    `android_uid` derives the key from it and the header's rand, as Android QQ does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rand = sample_rand(seed)
    if android_uid is not None:
        key = android_key(android_uid, rand)
    if rows is None:
        generated, generated_map = generate_history(messages, seed)
        if malformed:
            _damage(generated, malformed, random.Random(seed + 1))
        if wal_messages:
            generated, wal_rows = generated[:-wal_messages], [*generated[-wal_messages:], *wal_rows]
        rows = generated
        uid_map = {**generated_map, **(uid_map or {})}
    elif uid_map is None:
        uid_map = {OWNER_UID: int(OWNER_UIN)}
    final = out_dir / "nt_msg.db"
    final_wal = out_dir / "nt_msg.db-wal"
    work = Path(tempfile.mkdtemp(prefix="qq-twin-sample-", dir=out_dir))
    os.chmod(work, PRIVATE_DIR_MODE)
    try:
        db = work / "body.db"
        conn = _open_new(db, key, hmac)
        _create_schema(conn)
        _insert(conn, rows, uid_map)
        if wal_rows:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        wal_bytes = None
        if wal_rows:
            wal_bytes = _append_in_wal(db, key, hmac, wal_rows)
        with atomic_path(final) as tmp, tmp.open("wb") as fout, db.open("rb") as fin:
            if header and key is not None:
                fout.write(make_header(hmac, rand))
            shutil.copyfileobj(fin, fout, 1 << 20)
        if wal_bytes is not None:
            with atomic_path(final_wal) as tmp:
                tmp.write_bytes(wal_bytes)
        else:
            final_wal.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _damage(rows: list[SampleRow], count: int, rng: random.Random) -> None:
    candidates = [r for r in rows if r.msg_type in (MSG_NORMAL, MSG_REPLY) and r.elements]
    for i, row in enumerate(rng.sample(candidates, min(count, len(candidates)))):
        row.body = truncated_body(row.elements) if i % 2 == 0 else wrong_wire_type_body()


def _open_new(path: Path, key: str | None, hmac: str) -> sqlcipher3.Connection:
    conn = sqlcipher3.connect(str(path))
    apply_qq_cipher(conn, key, hmac)
    if key is None:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    return conn


def _create_schema(conn: sqlcipher3.Connection) -> None:
    columns = ", ".join(
        f'"{c}" {_COLUMN_TYPES.get(c, "INTEGER")}' + (" PRIMARY KEY" if c == "40001" else "")
        for c in MSG_COLUMNS
    )
    for table in ("c2c_msg_table", "group_msg_table"):
        conn.execute(f"CREATE TABLE {table} ({columns})")
    conn.execute(
        'CREATE TABLE nt_uid_mapping_table ("48901" INTEGER PRIMARY KEY, "48902" TEXT, '
        '"48912" INTEGER, "1002" INTEGER)'
    )
    conn.execute("CREATE TABLE buddy_list (uid TEXT)")  # QQ keeps other tables too


def _row_values(row: SampleRow) -> tuple:
    body = row.encoded_body()
    return (
        row.msg_id,
        row.msg_id & 0x7FFFFFFF,
        row.seq,
        row.chat_type,
        row.msg_type,
        0,
        row.send_type,
        row.sender_uid,
        row.peer_uid,
        0,
        0,
        row.peer,
        row.sender_uin,
        0,
        row.status,
        row.time,
        row.time,
        row.time - row.time % 86400,
        row.card,
        row.nick,
        int(any(e.get("sub_type") in (B.AT_ONE, B.AT_ALL) for e in row.elements)),
        body,
        row.reply_seq,
        None,
    )


def _insert(conn: sqlcipher3.Connection, rows: Iterable[SampleRow], uid_map: dict[str, int]) -> None:
    marks = ", ".join("?" * len(MSG_COLUMNS))
    c2c = [_row_values(r) for r in rows if r.chat_type != CHAT_GROUP]
    group = [_row_values(r) for r in rows if r.chat_type == CHAT_GROUP]
    with conn:  # one transaction
        conn.executemany(f"INSERT INTO c2c_msg_table VALUES ({marks})", c2c)
        conn.executemany(f"INSERT INTO group_msg_table VALUES ({marks})", group)
        conn.executemany(
            "INSERT OR REPLACE INTO nt_uid_mapping_table VALUES (?, ?, ?, ?)",
            [(i, uid, 0, uin) for i, (uid, uin) in enumerate(sorted(uid_map.items()), start=1)],
        )


def _append_in_wal(db: Path, key: str | None, hmac: str, rows: Sequence[SampleRow]) -> bytes:
    """Insert `rows` in WAL mode and return the `-wal` bytes before any checkpoint.

    The main file stays as it was (closing would checkpoint, so the main file is
    restored from a snapshot taken first): those rows exist only in the WAL.
    """
    snapshot = db.with_name("snapshot.db")
    shutil.copyfile(db, snapshot)
    conn = _open_new(db, key, hmac)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    _insert(conn, rows, {})
    wal = db.with_name(db.name + "-wal").read_bytes()
    conn.close()
    os.replace(snapshot, db)
    return wal
