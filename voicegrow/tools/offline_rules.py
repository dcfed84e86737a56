"""The built-in tools understood by rule, in Chinese and English, for the offline responder.

With no language model configured the server still sets timers, tells the time and turns the
volume down: :func:`match` turns a transcript into one built-in tool call, and :func:`phrase` turns
the tool's result into the sentence to speak. Plain text in, plain text out; nothing here knows
about turns or devices.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

__all__ = ["clock_words", "duration_words", "match", "parse_number", "phrase"]

_ZH_DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8,
              "九": 9}
_EN_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_EN_NUMBERS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "ninety": 90, "a": 1, "an": 1})


def parse_number(word: str) -> int | None:
    """12, "twelve", "twenty five", 十二, 两, 四十五 → the integer; None if it is not a number."""
    word = word.strip().lower().replace("-", " ")
    if word.isdigit():
        return int(word)
    if word and all(part in _EN_NUMBERS for part in word.split()):
        return sum(_EN_NUMBERS[part] for part in word.split())
    if word and all(ch in _ZH_DIGITS or ch in "十百" for ch in word):
        total, current = 0, 0
        for ch in word:
            if ch == "百":
                total += (current or 1) * 100
                current = 0
            elif ch == "十":
                total += (current or 1) * 10
                current = 0
            else:
                current = current * 10 + _ZH_DIGITS[ch] if current else _ZH_DIGITS[ch]
        return total + current
    return None


_EN_NUM = r"\d+|(?:(?:twenty|thirty|forty|fifty|sixty|ninety)[ -]?)?(?:zero|one|two|three|four|five|six|seven|" \
          r"eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen)|" \
          r"twenty|thirty|forty|fifty|sixty|ninety|an?"
_ZH_NUM = r"[0-9零〇一二两三四五六七八九十百]+"
_EN_UNITS = {"second": 1, "sec": 1, "minute": 60, "min": 60, "hour": 3600}
_ZH_UNITS = {"秒": 1, "秒钟": 1, "分钟": 60, "分": 60, "小时": 3600, "个小时": 3600, "钟头": 3600, "个钟头": 3600}

_STOP_EN = re.compile(r"^\W*(?:please\s+)?(?:stop|pause|quiet|be quiet|shut up|enough|stop talking|that's enough|"
                      r"cancel that)(?:\s+(?:it|now|please|talking))*\W*$", re.I)
_STOP_ZH = re.compile(r"^\W*(?:请)?(?:停|停下|停止|停一下|暂停|别说了|不要说了|不用说了|安静|闭嘴|够了)(?:吧|了|一下)?\W*$")
_TIME_EN = re.compile(r"\b(what time|what's the time|the time|time is it|what day|which day|what date|"
                      r"what's the date|the date|today's date|day of the week|day is it|day is today)\b", re.I)
_TIME_ZH = re.compile(r"几点|什么时间|时间是|日期|星期几|礼拜几|周几|几号|几月|哪天|哪一天")
_TIMER_EN = re.compile(rf"\btimer\b.*?\bfor\s+(?P<n>{_EN_NUM})\s+(?P<u>second|sec|minute|min|hour)s?\b|"
                       rf"\b(?P<n2>{_EN_NUM})[ -](?P<u2>second|sec|minute|min|hour)s?\s+timer\b", re.I)
_TIMER_ZH = re.compile(rf"(?P<n>{_ZH_NUM}|半)(?P<u>秒钟|秒|分钟|分|个小时|小时|个钟头|钟头)(?:的|后)?.*?(?:计时|定时|提醒|闹钟)|"
                       rf"(?:计时|定时|倒计时).*?(?P<n2>{_ZH_NUM})(?P<u2>秒钟|秒|分钟|分|个小时|小时)")
_ALARM_EN = re.compile(rf"\b(?:wake me(?: up)?|alarm)\b.*?\b(?:at|for)\s+(?P<h>{_EN_NUM})(?:(?::|\s)(?P<m>\d\d|"
                       rf"thirty|fifteen|forty[ -]five|o'clock))?\s*(?P<ap>a\.?m\.?|p\.?m\.?|in the morning|"
                       rf"tomorrow morning|in the evening|tonight)?", re.I)
_ALARM_ZH = re.compile(rf"(?P<ap>早上|早晨|明早|明天早上|上午|中午|下午|晚上|今晚|明晚)?(?P<h>{_ZH_NUM})点(?P<m>半|{_ZH_NUM}分?)?"
                       r".*?(?:叫我|喊我|闹钟|提醒我|起床)")
_CANCEL_EN = re.compile(r"\b(?:cancel|delete|remove|turn off|stop)\b.*?\b(?P<k>timer|alarm)s?\b", re.I)
_CANCEL_ZH = re.compile(r"(?:取消|删掉|删除|关掉|关闭)(?:掉)?.*?(?P<k>闹钟|计时器|计时|定时器|定时|提醒)")
_LIST_EN = re.compile(r"\b(?:what|which|any|list|how many)\b.*?\b(?:timers?|alarms?)\b", re.I)
_LIST_ZH = re.compile(r"(?:有|有哪些|有什么|有几个|列出|查一下|看看).*?(?:闹钟|计时器|定时|提醒)")
_VOL_SET_EN = re.compile(r"\bvolume\b.*?\bto\s+(?P<n>\d+|" + _EN_NUM + r")\b", re.I)
_VOL_UP_EN = re.compile(r"\b(?:louder|volume up|turn (?:it|the volume|the sound) up|turn up the (?:volume|sound)|"
                        r"(?:increase|raise) the volume)\b", re.I)
_VOL_DOWN_EN = re.compile(r"\b(?:softer|quieter|volume down|turn (?:it|the volume|the sound) down|"
                          r"turn down the (?:volume|sound)|(?:decrease|lower|reduce) the volume|too loud)\b", re.I)
_VOL_SET_ZH = re.compile(rf"(?:音量|声音).*?(?:调到|调成|设为|设置为|设成|改成)(?:百分之)?(?P<n>{_ZH_NUM})")
_VOL_UP_ZH = re.compile(r"(?:音量|声音).*?(?:调大|大一点|大一些|大点|加大|提高|调高|高一点|响一点)|大声一点|大声点|太小声")
_VOL_DOWN_ZH = re.compile(r"(?:音量|声音).*?(?:调小|小一点|小一些|小点|减小|降低|调低|低一点|轻一点)|小声一点|小声点|太吵|太响")


def _zh_minutes(raw: str | None) -> int:
    if not raw:
        return 0
    if raw == "半":
        return 30
    return parse_number(raw.rstrip("分")) or 0


def match(text: str, lang: str) -> tuple[str, dict[str, Any]] | None:
    """The built-in tool call a transcript asks for, as (name, arguments), or None."""
    text = text.strip()
    if lang == "zh":
        return _match_zh(text)
    return _match_en(text)


def _match_en(text: str) -> tuple[str, dict[str, Any]] | None:
    if _STOP_EN.match(text):
        return "stop", {}
    if found := _CANCEL_EN.search(text):
        return "cancel_timer", {"kind": found["k"].lower()}
    if found := _TIMER_EN.search(text):
        number, unit = (found["n"], found["u"]) if found["n"] else (found["n2"], found["u2"])
        seconds = (parse_number(number) or 0) * _EN_UNITS[unit.lower()]
        if seconds > 0:
            return "set_timer", {"seconds": seconds}
    if found := _ALARM_EN.search(text):
        hour = parse_number(found["h"])
        minute_word = (found["m"] or "").lower().replace("-", " ")
        minute = 0 if minute_word in ("", "o'clock") else parse_number(minute_word)
        period = (found["ap"] or "").lower().replace(".", "")
        if hour is not None and minute is not None and hour <= 23 and minute <= 59:
            if period in ("pm", "in the evening", "tonight") and hour < 12:
                hour += 12
            elif period in ("am", "in the morning", "tomorrow morning") and hour == 12:
                hour = 0
            return "set_alarm", {"time": f"{hour:02d}:{minute:02d}"}
    return _simple(text, _LIST_EN, _VOL_SET_EN, _VOL_DOWN_EN, _VOL_UP_EN, _TIME_EN)


def _match_zh(text: str) -> tuple[str, dict[str, Any]] | None:
    if _STOP_ZH.match(text):
        return "stop", {}
    if found := _CANCEL_ZH.search(text):
        return "cancel_timer", {"kind": "alarm" if found["k"] == "闹钟" else "timer" if "计时" in found["k"] else "any"}
    if found := _TIMER_ZH.search(text):
        number, unit = (found["n"], found["u"]) if found["n"] else (found["n2"], found["u2"])
        value = 0.5 if number == "半" else (parse_number(number) or 0)
        seconds = int(value * _ZH_UNITS[unit])
        if seconds > 0:
            return "set_timer", {"seconds": seconds}
    if found := _ALARM_ZH.search(text):
        hour, minute = parse_number(found["h"]), _zh_minutes(found["m"])
        if hour is not None and hour <= 23 and minute <= 59:
            if found["ap"] in ("下午", "晚上", "今晚", "明晚") and hour < 12:
                hour += 12
            elif found["ap"] == "中午" and hour < 6:
                hour += 12
            return "set_alarm", {"time": f"{hour:02d}:{minute:02d}"}
    return _simple(text, _LIST_ZH, _VOL_SET_ZH, _VOL_DOWN_ZH, _VOL_UP_ZH, _TIME_ZH)


def _simple(text: str, listing: re.Pattern[str], volume_set: re.Pattern[str], volume_down: re.Pattern[str],
            volume_up: re.Pattern[str], time: re.Pattern[str]) -> tuple[str, dict[str, Any]] | None:
    """The rules that read the same in both languages: list, volume, time (in this order)."""
    if listing.search(text):
        return "list_timers", {}
    if found := volume_set.search(text):
        level = parse_number(found["n"])
        if level is not None and 0 <= level <= 100:
            return "set_volume", {"action": "set", "level": level}
    if volume_down.search(text):
        return "set_volume", {"action": "down"}
    if volume_up.search(text):
        return "set_volume", {"action": "up"}
    if time.search(text):
        return "get_time", {}
    return None


# -- saying the result ----------------------------------------------------------------------------------


def duration_words(seconds: int, lang: str) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if lang == "zh":
        parts = [f"{hours}小时" if hours else "", f"{minutes}分钟" if minutes else "", f"{secs}秒" if secs else ""]
        return "".join(parts) or "0秒"
    words = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in ((hours, "hour"), (minutes, "minute"),
                                                                   (secs, "second")) if n]
    return " ".join(words) or "0 seconds"


def clock_words(moment: datetime, lang: str) -> str:
    """7:05 as a speaker says it: 上午7点05分 / 7:05 AM."""
    hour12 = moment.hour % 12 or 12
    if lang == "zh":
        period = "凌晨" if moment.hour < 6 else "上午" if moment.hour < 12 else "下午" if moment.hour < 18 else "晚上"
        return f"{period}{hour12}点{moment.minute:02d}分" if moment.minute else f"{period}{hour12}点"
    return f"{hour12}:{moment.minute:02d} {'AM' if moment.hour < 12 else 'PM'}"


def phrase(name: str, result_text: str, lang: str) -> str | None:
    """The sentence for a built-in tool's result; None for ``get_time`` (the responder's own answer)
    and for a tool it does not know."""
    zh = lang == "zh"
    try:
        result = json.loads(result_text)
    except ValueError:
        result = {}
    if not isinstance(result, dict):
        result = {}
    if "error" in result:
        return (f"抱歉，没有办成：{result['error']}" if zh else f"Sorry, that didn't work: {result['error']}")
    if name == "set_timer" and "seconds" in result:
        length = duration_words(int(result["seconds"]), lang)
        return f"好的，{length}的计时开始了。" if zh else f"OK, a {length} timer is running."
    if name == "set_alarm" and "rings_at" in result:
        when = clock_words(datetime.fromisoformat(result["rings_at"]), lang)
        day = result.get("day") == "tomorrow"
        return (f"好的，{'明天' if day else '今天'}{when}叫你。" if zh
                else f"OK, I'll wake you at {when} {'tomorrow' if day else 'today'}.")
    if name == "cancel_timer":
        count = len(result.get("cancelled") or [])
        return f"好的，取消了{count}个。" if zh else f"OK, cancelled {count}."
    if name == "list_timers":
        timers = result.get("timers") or []
        if not timers:
            return "现在没有计时器或闹钟。" if zh else "You have no timers or alarms."
        parts = []
        for t in timers[:5]:
            at = clock_words(datetime.fromisoformat(t["at"]), lang)
            kind = ("闹钟" if t["kind"] == "alarm" else "计时器") if zh else t["kind"]
            parts.append(f"{at}的{kind}" if zh else f"a {kind} at {at}")
        return (f"你有{len(timers)}个：" + "，".join(parts) + "。") if zh else (
            f"You have {len(timers)}: " + ", ".join(parts) + ".")
    if name == "set_volume" and "volume" in result:
        return f"好的，音量调到{result['volume']}。" if zh else f"OK, volume {result['volume']}."
    if name == "stop":
        return ""
    return None
