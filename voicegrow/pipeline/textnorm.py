"""Written forms a voice would misread, turned into the words a person says (Chinese and English).

A TTS voice reads characters; "7:30", "25℃", "¥35.50" or "13812345678" are not words, and an
offline voice that meets them says something wrong or nothing ("7:30" came out as "七三十"). So each
sentence is rewritten before synthesis: times, dates, money, percentages, temperatures, phone
numbers, units, ordinals, years and plain numbers, ranges and symbols, into ``七点半`` or
``seven thirty``. In Chinese text, capitalised abbreviations are spaced out letter by letter ("NBA" →
"N B A") so that a voice spells them; other English words are left for the voice's own lexicon.

The rules run in a fixed order, most specific first (a phone number before a plain number, a date
before a range), and each rule's output contains no ASCII digits, so a later rule never reads the
words of an earlier one. Plain functions of the text: no state, no I/O, safe in any thread.
Numbers in Chinese are read by ``cn2an``, in English by ``num2words``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

__all__ = ["normalize", "normalize_en", "normalize_zh"]

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]

_FULL_WIDTH = str.maketrans({chr(0xFF10 + i): str(i) for i in range(10)}
                            | {chr(0xFF21 + i): chr(0x41 + i) for i in range(26)}
                            | {chr(0xFF41 + i): chr(0x61 + i) for i in range(26)}
                            | {"％": "%", "＄": "$", "＋": "+", "＝": "=", "／": "/", "～": "~", "￥": "¥",
                               "＆": "&", "＠": "@", "＃": "#", "°": "°"})
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")
_NUM = r"\d+(?:\.\d+)?"


def normalize(text: str, lang: str) -> str:
    """The sentence as it should be spoken, for ``lang`` ``"zh"`` or ``"en"`` (others: English)."""
    return normalize_zh(text) if lang.startswith("zh") else normalize_en(text)


def _prepare(text: str) -> str:
    return _THOUSANDS.sub(lambda m: m.group().replace(",", ""), text.translate(_FULL_WIDTH))


def _apply(text: str, rules: list[Rule]) -> str:
    for pattern, replace in rules:
        text = pattern.sub(replace, text)
    return text


# -- Chinese ------------------------------------------------------------------------------------------

_ZH_DIGITS = "零一二三四五六七八九"
_LIANG_BEFORE = frozenset("个只位名本件条张台辆次天岁年月周层杯瓶碗斤种块双对把架首回分秒")


@lru_cache(maxsize=1)
def _cn2an() -> Callable[[str, str], str]:
    import cn2an  # noqa: PLC0415 - jieba-free, but a few MB of tables: load it once, when needed

    return cn2an.an2cn


def _read_number(text: str, integer: Callable[[str], str], point: str, digits: Callable[[str], str],
                 minus: str) -> str:
    """A signed decimal in words: the whole part as a number, the fraction digit by digit."""
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-+").partition(".")
    words = integer(whole or "0") + (point + digits(frac) if frac else "")
    return (minus if negative else "") + words


def zh_number(digits: str) -> str:
    """"1203" → 一千二百零三, "3.05" → 三点零五, "-2" → 负二."""
    return _read_number(digits, _zh_integer, "点", zh_digits, "负")


def _zh_integer(digits: str) -> str:
    if len(digits) > 1 and digits.startswith("0"):
        return zh_digits(digits)  # "007", a code: digit by digit
    if len(digits) > 16:
        return zh_digits(digits)
    return _cn2an()(digits, "low")


def zh_digits(digits: str, *, phone: bool = False) -> str:
    """Digit by digit; in phone numbers 1 is read 幺, as people do to tell it from 七."""
    return "".join(("幺" if phone and d == "1" else _ZH_DIGITS[int(d)]) for d in digits if d.isdigit())


def _zh_count(digits: str) -> str:
    """A count before a measure word: 2 is 两 (两个人, 两点), 12 stays 十二."""
    return "两" if digits == "2" else zh_number(digits)


def _zh_time(m: re.Match[str]) -> str:
    hour, minute, second = int(m["h"]), int(m["m"]), m.groupdict().get("s")
    text = _zh_count(str(hour)) + "点"
    if minute == 30 and second is None:
        text += "半"
    elif minute == 0 and second is None:
        pass
    elif minute < 10:
        text += "零" + zh_number(str(minute)) + "分"
    else:
        text += zh_number(str(minute)) + "分"
    if second is not None:
        if minute == 0:
            text += "零分"
        text += zh_number(str(int(second))) + "秒"
    return text


def _zh_date(m: re.Match[str]) -> str:
    text = ""
    if m["y"]:
        text += zh_digits(m["y"]) + "年"
    text += zh_number(str(int(m["mo"]))) + "月"
    if m["d"]:
        text += zh_number(str(int(m["d"]))) + (m["suffix"] or "日")
    return text


def _zh_money(m: re.Match[str]) -> str:
    symbol, amount = m["sym"] or "", m["amount"]
    unit = {"$": "美元", "€": "欧元", "£": "英镑", "¥": "元", "HK$": "港币"}.get(symbol, m["unit"] or "元")
    if unit == "元" and "." in amount:
        whole, frac = amount.split(".", 1)
        frac = (frac + "0")[:2]
        text = (_zh_count(str(int(whole))) + "元") if int(whole) else ""
        jiao, fen = int(frac[0]), int(frac[1])
        if jiao:
            text += zh_number(str(jiao)) + "角"
        elif fen and text:
            text += "零"
        if fen:
            text += zh_number(str(fen)) + "分"
        return text or "零元"
    return (_zh_count(amount) if unit == "元" else zh_number(amount)) + unit


def _zh_temperature(m: re.Match[str]) -> str:
    value, scale = m["v"], m["scale"]
    below = value.startswith("-")
    number = zh_number(value.lstrip("-"))
    if scale in ("°F", "℉"):
        return ("零下" if below else "") + "华氏" + number + "度"
    text = number + ("摄氏度" if scale in ("℃", "°C") else "度")
    return ("零下" if below else "") + text


_ZH_UNITS = {
    "km/h": "公里每小时", "m/s": "米每秒", "km²": "平方公里", "m²": "平方米", "m³": "立方米", "cm²": "平方厘米",
    "kWh": "千瓦时", "kW": "千瓦", "km": "公里", "kg": "公斤", "mg": "毫克", "cm": "厘米", "mm": "毫米",
    "ml": "毫升", "mL": "毫升", "GB": "G", "MB": "兆", "KB": "K", "TB": "T", "Hz": "赫兹", "kHz": "千赫兹",
    "MHz": "兆赫", "GHz": "吉赫", "mAh": "毫安时", "min": "分钟", "L": "升", "m": "米", "g": "克", "W": "瓦",
    "V": "伏", "h": "小时", "s": "秒", "t": "吨", "lb": "磅", "ft": "英尺",
}
_ZH_UNIT_RE = "|".join(re.escape(u) for u in sorted(_ZH_UNITS, key=len, reverse=True))


def _zh_unit(m: re.Match[str]) -> str:
    unit = _ZH_UNITS[m["unit"]]
    number = _zh_count(m["n"]) if unit in ("小时", "分钟", "公斤", "公里", "米", "升", "吨") else zh_number(m["n"])
    return number + unit


def _zh_plain_number(m: re.Match[str]) -> str:
    number, after = m["n"], m["after"] or ""
    if after == "年" and re.fullmatch(r"\d{4}", number):
        return zh_digits(number) + after  # 二零二四年
    if len(number) >= 9 and "." not in number:
        return zh_digits(number) + after  # an account or order number: digit by digit
    if after and (after in _LIANG_BEFORE or after in ("小时", "分钟", "公里", "公斤")):
        return _zh_count(number) + after
    return zh_number(number) + after


_ZH_SYMBOLS = {"+": "加", "=": "等于", "×": "乘", "÷": "除以", "&": "和", "@": " at ", "#": "井号", "%": "百分号",
               "‰": "千分号", "°": "度", "~": "到", "℃": "摄氏度"}

_ZH_RULES: list[Rule] = [
    # phone numbers: mobile, landline with area code, 400/800 service numbers
    (re.compile(r"(?<!\d)(?:\+?86[- ]?)?(1[3-9]\d)[- ]?(\d{4})[- ]?(\d{4})(?!\d)"),
     lambda m: "，".join(zh_digits(g, phone=True) for g in m.groups())),
    (re.compile(r"(?<!\d)(0\d{2,3}|[48]00)-(\d{3,4})-?(\d{4})(?!\d)"),
     lambda m: "，".join(zh_digits(g, phone=True) for g in m.groups())),
    # codes people read digit by digit: 验证码382916, 尾号1234, 房间1203
    (re.compile(r"(?P<label>验证码|密码|编号|号码|尾号|单号|房间号?|车牌号?|工号|学号|邮编)(?P<sep>\s*[:：是为]?\s*)(?P<n>\d+)"),
     lambda m: m["label"] + m["sep"] + zh_digits(m["n"], phone=True)),
    # dates: 2024-03-05, 2024/3/5, 2024年3月5日, 3月5日, 3月5号
    (re.compile(r"(?<!\d)(?P<y>\d{4})[-/.](?P<mo>1[0-2]|0?[1-9])[-/.](?P<d>3[01]|[12]\d|0?[1-9])(?P<suffix>)(?!\d)"),
     _zh_date),
    (re.compile(r"(?:(?P<y>\d{4})年)?(?P<mo>1[0-2]|0?[1-9])月(?:(?P<d>3[01]|[12]\d|0?[1-9])(?P<suffix>[日号]))?"),
     _zh_date),
    # times: 7:30, 19:05:10
    (re.compile(r"(?<![\d:])(?P<h>[01]?\d|2[0-4])[:：](?P<m>[0-5]\d)(?:[:：](?P<s>[0-5]\d))?(?![\d:])"), _zh_time),
    (re.compile(r"(?<!\d)(?P<h>[01]?\d|2[0-4])点(?P<m>[0-5]\d)分?"), _zh_time),
    # money
    (re.compile(r"(?P<sym>HK\$|[$€£¥])\s?(?P<amount>" + _NUM + r")(?P<unit>)"), _zh_money),
    (re.compile(r"(?P<sym>)(?P<amount>" + _NUM + r")\s?(?P<unit>元|块钱|块)(?![\d])"),
     lambda m: _zh_money(m) if m["unit"] == "元" else _zh_count(m["amount"]) + m["unit"]),
    # percentages and per mille
    (re.compile(r"(?P<n>-?" + _NUM + r")\s?%"), lambda m: "百分之" + zh_number(m["n"])),
    (re.compile(r"(?P<n>-?" + _NUM + r")\s?‰"), lambda m: "千分之" + zh_number(m["n"])),
    # temperatures: 25℃, -5°C, 77°F, 30度 (read by the plain number rule)
    (re.compile(r"(?P<v>-?" + _NUM + r")\s?(?P<scale>℃|℉|°C|°F|°)"), _zh_temperature),
    # ordinals and numbered things
    (re.compile(r"第\s?(?P<n>\d+)"), lambda m: "第" + zh_number(m["n"])),
    (re.compile(r"\b[Nn][Oo]\.\s?(?P<n>\d+)"), lambda m: zh_number(m["n"]) + "号"),
    # ranges: 3-5天, 10~20度
    (re.compile(r"(?<![\d.])(?P<a>" + _NUM + r")\s?[-~－–—]\s?(?P<b>" + _NUM + r")(?![\d])"),
     lambda m: zh_number(m["a"]) + "到" + zh_number(m["b"])),
    # fractions: 1/2 → 二分之一
    (re.compile(r"(?<![\d/])(?P<a>\d+)/(?P<b>\d+)(?![\d/])"),
     lambda m: zh_number(m["b"]) + "分之" + zh_number(m["a"])),
    # units after a number: 5km, 2.5L, 100m², 60km/h
    (re.compile(r"(?P<n>" + _NUM + r")\s?(?P<unit>" + _ZH_UNIT_RE + r")(?![A-Za-z])"), _zh_unit),
    # arithmetic between numbers: 3+5=8, 3×4, 8÷2
    (re.compile(r"(?<=\d)\s?([+×÷*=])\s?(?=-?\d)"),
     lambda m: {"*": "乘"}.get(m[1], _ZH_SYMBOLS.get(m[1], m[1]))),
    (re.compile(r"(?<![\w.])-(?=\d)"), lambda m: "负"),
    # numbers left: years before 年, counts before measure words, codes digit by digit, the rest read out
    (re.compile(r"(?P<n>" + _NUM + r")(?P<after>小时|分钟|公里|公斤|[年个只位名本件条张台辆次天岁月周层杯瓶碗斤种块双对把架首回分秒]?)"),
     _zh_plain_number),
    # capitalised abbreviations spelled (NBA, TV, AI, iPad stays a word); mixed letters+digits handled above
    (re.compile(r"(?<![A-Za-z])([A-Z]{2,6})(?![A-Za-z])"), lambda m: " ".join(m[1])),
    (re.compile(r"[+=×÷&@#%‰°~℃]"), lambda m: _ZH_SYMBOLS[m.group()]),
]


def normalize_zh(text: str) -> str:
    """Chinese text for a Chinese voice: every digit and symbol turned into characters."""
    return _apply(_prepare(text), _ZH_RULES)


# -- English ------------------------------------------------------------------------------------------

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_MONTH_RE = ("Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
             "Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?")


@lru_cache(maxsize=1)
def _num2words() -> Callable[..., str]:
    from num2words import num2words  # noqa: PLC0415

    return num2words


def en_number(text: str) -> str:
    """"1203" → one thousand two hundred and three, "3.14" → three point one four, "-2" → minus two."""
    return _read_number(text, _en_integer, " point ", en_digits, "minus ")


def _en_integer(digits: str) -> str:
    if len(digits) > 1 and digits.startswith("0") or len(digits) > 15:
        return en_digits(digits)
    return _num2words()(int(digits)).replace(",", "")


_EN_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def en_digits(digits: str) -> str:
    return " ".join(_EN_DIGITS[int(d)] for d in digits if d.isdigit())


def en_ordinal(n: int) -> str:
    return _num2words()(n, to="ordinal").replace(",", "")


def en_year(digits: str) -> str:
    year = int(digits)
    if 2000 <= year <= 2009 or year % 1000 == 0:
        return _en_integer(digits)
    return _num2words()(year, to="year")


def _en_time(m: re.Match[str]) -> str:
    hour, minute = int(m["h"]), int(m["m"])
    if minute == 0:
        words = en_number(str(hour)) + ("" if m["ampm"] else " o'clock")
    elif minute < 10:
        words = f"{en_number(str(hour))} oh {en_number(str(minute))}"
    else:
        words = f"{en_number(str(hour))} {en_number(str(minute))}"
    if m["ampm"]:
        words += " a m" if m["ampm"].lower().startswith("a") else " p m"
    return words


def _en_iso_date(m: re.Match[str]) -> str:
    return f"{_MONTHS[int(m['mo']) - 1]} {en_ordinal(int(m['d']))}, {en_year(m['y'])}"


def _en_month_day(m: re.Match[str]) -> str:
    month = next(name for name in _MONTHS if name.lower().startswith(m["month"].lower()[:3]))
    text = f"{month} {en_ordinal(int(m['d']))}"
    if m["y"]:
        text += f", {en_year(m['y'])}"
    return text


_CURRENCIES = {"$": ("dollar", "dollars", "cent", "cents"), "€": ("euro", "euros", "cent", "cents"),
               "£": ("pound", "pounds", "penny", "pence"), "¥": ("yuan", "yuan", "fen", "fen")}


def _en_money(m: re.Match[str]) -> str:
    one, many, sub_one, sub_many = _CURRENCIES[m["sym"]]
    whole, _, frac = m["amount"].partition(".")
    scale = m["scale"] or ""
    if scale:
        return f"{en_number(m['amount'])} {scale} {many}"
    units = int(whole or "0")
    cents = int((frac + "0")[:2]) if frac else 0
    parts = []
    if units or not cents:
        parts.append(f"{en_number(str(units))} {one if units == 1 else many}")
    if cents:
        parts.append(f"{en_number(str(cents))} {sub_one if cents == 1 else sub_many}")
    return " and ".join(parts)


def _en_temperature(m: re.Match[str]) -> str:
    number = en_number(m["v"])
    degrees = "degree" if m["v"] in ("1", "-1") else "degrees"
    scale = {"C": " Celsius", "F": " Fahrenheit"}.get((m["scale"] or "").upper(), "")
    return f"{number} {degrees}{scale}"


_EN_UNITS = {
    "km/h": ("kilometer per hour", "kilometers per hour"), "mph": ("mile per hour", "miles per hour"),
    "km": ("kilometer", "kilometers"), "kg": ("kilogram", "kilograms"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "mg": ("milligram", "milligrams"), "ml": ("milliliter", "milliliters"),
    "mL": ("milliliter", "milliliters"), "lbs": ("pound", "pounds"), "lb": ("pound", "pounds"),
    "oz": ("ounce", "ounces"), "ft": ("foot", "feet"), "GB": ("gigabyte", "gigabytes"),
    "MB": ("megabyte", "megabytes"), "TB": ("terabyte", "terabytes"), "kWh": ("kilowatt hour", "kilowatt hours"),
    "kW": ("kilowatt", "kilowatts"), "Hz": ("hertz", "hertz"), "GHz": ("gigahertz", "gigahertz"),
    "min": ("minute", "minutes"), "mins": ("minute", "minutes"), "hrs": ("hour", "hours"), "hr": ("hour", "hours"),
    "h": ("hour", "hours"), "sec": ("second", "seconds"), "s": ("second", "seconds"), "L": ("liter", "liters"),
    "m": ("meter", "meters"), "g": ("gram", "grams"), "W": ("watt", "watts"), "V": ("volt", "volts"),
}
_EN_UNIT_RE = "|".join(re.escape(u) for u in sorted(_EN_UNITS, key=len, reverse=True))


def _en_unit(m: re.Match[str]) -> str:
    one, many = _EN_UNITS[m["unit"]]
    return f"{en_number(m['n'])} {one if m['n'] == '1' else many}"


def _en_fraction(m: re.Match[str]) -> str:
    a, b = int(m["a"]), int(m["b"])
    if b == 2:
        return "one half" if a == 1 else f"{en_number(str(a))} halves"
    if b == 4:
        return "one quarter" if a == 1 else f"{en_number(str(a))} quarters"
    denominator = en_ordinal(b)
    return f"{en_number(str(a))} {denominator}{'' if a == 1 else 's'}"


def _en_plain_number(m: re.Match[str]) -> str:
    number = m.group()
    if re.fullmatch(r"1[1-9]\d\d|20\d\d", number):
        return en_year(number)  # 1998 → nineteen ninety-eight; counts that size read alike
    if len(number) >= 9 and "." not in number:
        return en_digits(number)
    return en_number(number)


_EN_SYMBOLS = {"&": " and ", "+": " plus ", "=": " equals ", "@": " at ", "%": " percent", "×": " times ",
               "÷": " divided by ", "°": " degrees", "#": " number "}

_EN_RULES: list[Rule] = [
    # phone numbers: (555) 123-4567, 555-123-4567, 555-1234, +1 ...
    (re.compile(r"(?<![\d-])(?:\+?1[-. ])?\(?(\d{3})\)?[-. ](\d{3})[-. ](\d{4})(?![\d-])"),
     lambda m: ", ".join(en_digits(g) for g in m.groups())),
    (re.compile(r"(?<![\d-])(\d{3})-(\d{4})(?![\d-])"), lambda m: ", ".join(en_digits(g) for g in m.groups())),
    # codes people read digit by digit: 验证码382916, 尾号1234, 房间1203
    (re.compile(r"(?P<label>验证码|密码|编号|号码|尾号|单号|房间号?|车牌号?|工号|学号|邮编)(?P<sep>\s*[:：是为]?\s*)(?P<n>\d+)"),
     lambda m: m["label"] + m["sep"] + zh_digits(m["n"], phone=True)),
    # dates: 2024-03-05, March 5th, 2024, Mar 5
    (re.compile(r"(?<!\d)(?P<y>\d{4})-(?P<mo>1[0-2]|0[1-9])-(?P<d>3[01]|[12]\d|0[1-9])(?!\d)"), _en_iso_date),
    (re.compile(r"\b(?P<month>" + _MONTH_RE + r")\.?\s+(?P<d>3[01]|[12]\d|0?[1-9])(?:st|nd|rd|th)?\b"
                r"(?:,?\s+(?P<y>\d{4})\b)?"), _en_month_day),
    # times: 7:30, 7:05 pm, 12:00 a.m.
    (re.compile(r"(?<![\d:])(?P<h>[01]?\d|2[0-4]):(?P<m>[0-5]\d)(?![\d:])"
                r"(?:\s?(?P<ampm>[AaPp]\.?[Mm]\.?)(?![A-Za-z]))?"), _en_time),
    (re.compile(r"(?<![\d:])(?P<h>1[0-2]|0?[1-9])\s?(?P<ampm>[AaPp]\.?[Mm]\.?)(?![A-Za-z])(?P<m>)"),
     lambda m: en_number(m["h"]) + (" a m" if m["ampm"].lower().startswith("a") else " p m")),
    # money: $3.50, €5, £1, ¥100, $2 million
    (re.compile(r"(?P<sym>[$€£¥])\s?(?P<amount>" + _NUM + r")(?:\s(?P<scale>thousand|million|billion))?"),
     _en_money),
    (re.compile(r"(?P<n>-?" + _NUM + r")\s?%"), lambda m: en_number(m["n"]) + " percent"),
    (re.compile(r"(?P<v>-?" + _NUM + r")\s?°\s?(?P<scale>[CcFf])?(?![A-Za-z])"), _en_temperature),
    # ordinals: 1st, 22nd, 103rd
    (re.compile(r"\b(?P<n>\d+)(?:st|nd|rd|th)\b"), lambda m: en_ordinal(int(m["n"]))),
    # ranges: 3-5 days
    (re.compile(r"(?<![\d.-])(?P<a>" + _NUM + r")\s?[-–~]\s?(?P<b>" + _NUM + r")(?![\d-])"),
     lambda m: en_number(m["a"]) + " to " + en_number(m["b"])),
    (re.compile(r"(?<![\d/])(?P<a>\d{1,2})/(?P<b>\d{1,2})(?![\d/])"), _en_fraction),
    (re.compile(r"(?P<n>" + _NUM + r")\s?(?P<unit>" + _EN_UNIT_RE + r")(?![A-Za-z])"), _en_unit),
    (re.compile(r"#\s?(?=\d)"), lambda m: "number "),
    (re.compile(r"(?<![\w.])-(?=\d)"), lambda m: "minus "),
    (re.compile(_NUM), _en_plain_number),
    (re.compile(r"[&+=@%×÷°#]"), lambda m: _EN_SYMBOLS[m.group()]),
    (re.compile(r"[ \t]{2,}"), lambda m: " "),
]


def normalize_en(text: str) -> str:
    """English text for an English voice: digits and symbols written out as words."""
    text = _THOUSANDS.sub(lambda m: en_number(m.group().replace(",", "")), text.translate(_FULL_WIDTH))
    return _apply(text, _EN_RULES).strip()
