"""Text normalisation before synthesis: what a voice is given for times, money, units, codes ..."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicegrow.pipeline.textnorm import normalize, normalize_en, normalize_zh

ZH_CASES = [
    # times
    ("现在是7:30。", "现在是七点半。"),
    ("7:05出发", "七点零五分出发"),
    ("闹钟定在6:00", "闹钟定在六点"),
    ("2:15开会", "两点十五分开会"),
    ("19:45:10", "十九点四十五分十秒"),
    ("上午10点05分", "上午十点零五分"),
    ("晚上8点30分睡觉", "晚上八点半睡觉"),
    # dates and years
    ("2024年3月5日", "二零二四年三月五日"),
    ("2024-03-05", "二零二四年三月五日"),
    ("2026/12/1", "二零二六年十二月一日"),
    ("3月5号是星期二", "三月五号是星期二"),
    ("1998年出生", "一九九八年出生"),
    ("12月", "十二月"),
    # money
    ("¥35.50", "三十五元五角"),
    ("35.5元", "三十五元五角"),
    ("一共3.05元", "一共三元零五分"),
    ("$20", "二十美元"),
    ("€9.9", "九点九欧元"),
    ("3块钱", "三块钱"),
    ("2元", "两元"),
    # percentages
    ("50%", "百分之五十"),
    ("湿度是65.5%", "湿度是百分之六十五点五"),
    ("3‰", "千分之三"),
    # temperatures
    ("今天25℃", "今天二十五摄氏度"),
    ("最低-5℃", "最低零下五摄氏度"),
    ("气温18°C", "气温十八摄氏度"),
    ("77°F", "华氏七十七度"),
    ("温度30度", "温度三十度"),
    # phone numbers and codes
    ("请拨打13812345678", "请拨打幺三八，幺二三四，五六七八"),
    ("电话010-12345678", "电话零幺零，幺二三四，五六七八"),
    ("400-123-4567", "四零零，幺二三，四五六七"),
    ("验证码382916", "验证码三八二九幺六"),
    ("房间1203", "房间幺二零三"),
    # units
    ("跑了5km", "跑了五公里"),
    ("2.5L水", "二点五升水"),
    ("限速60km/h", "限速六十公里每小时"),
    ("体重3kg", "体重三公斤"),
    ("100m²的房子", "一百平方米的房子"),
    ("身高120cm", "身高一百二十厘米"),
    ("2小时", "两小时"),
    # ordinals and numbers
    ("第3名", "第三名"),
    ("第12集", "第十二集"),
    ("No.5", "五号"),
    ("1234", "一千二百三十四"),
    ("0.5", "零点五"),
    ("1,234,567人", "一百二十三万四千五百六十七人"),
    ("2个苹果", "两个苹果"),
    ("12个", "十二个"),
    ("007", "零零七"),
    ("订单号20241203001", "订单号二零二四幺二零三零零幺"),
    ("1/2", "二分之一"),
    ("3-5天", "三到五天"),
    ("10~20度", "十到二十度"),
    ("-3", "负三"),
    # symbols
    ("3+5=8", "三加五等于八"),
    ("3×4", "三乘四"),
    ("猫&狗", "猫和狗"),
    ("全角１２３", "全角一百二十三"),
    # English words inside Chinese
    ("我喜欢NBA", "我喜欢N B A"),
    ("打开TV", "打开T V"),
    ("播放 Taylor Swift 的歌", "播放 Taylor Swift 的歌"),
    ("iPhone 15", "iPhone 十五"),
    ("5G网络", "五G网络"),
]

EN_CASES = [
    ("It's 7:30.", "It's seven thirty."),
    ("Leave at 7:05 pm", "Leave at seven oh five p m"),
    ("7:00", "seven o'clock"),
    ("at 3 pm", "at three p m"),
    ("2024-03-05", "March fifth, twenty twenty-four"),
    ("March 5th", "March fifth"),
    ("on Tuesday, December 1, 2026.", "on Tuesday, December first, twenty twenty-six."),
    ("$3.50", "three dollars and fifty cents"),
    ("$1", "one dollar"),
    ("€5", "five euros"),
    ("$2 million", "two million dollars"),
    ("50%", "fifty percent"),
    ("25°C", "twenty-five degrees Celsius"),
    ("-5°F", "minus five degrees Fahrenheit"),
    ("555-123-4567", "five five five, one two three, four five six seven"),
    ("Call 555-1234", "Call five five five, one two three four"),
    ("5 km", "five kilometers"),
    ("1 kg", "one kilogram"),
    ("60 mph", "sixty miles per hour"),
    ("1st", "first"),
    ("the 22nd", "the twenty-second"),
    ("in 1998", "in nineteen ninety-eight"),
    ("in 2005", "in two thousand and five"),
    ("1,234 people", "one thousand two hundred and thirty-four people"),
    ("3.14", "three point one four"),
    ("-5", "minus five"),
    ("1/2 cup", "one half cup"),
    ("3/4", "three quarters"),
    ("3-5 days", "three to five days"),
    ("Tom & Jerry", "Tom and Jerry"),
    ("2+2=4", "two plus two equals four"),
    ("#1", "number one"),
    ("I have 2 cats", "I have two cats"),
]


@pytest.mark.parametrize(("text", "spoken"), ZH_CASES)
def test_chinese(text: str, spoken: str) -> None:
    assert normalize_zh(text) == spoken
    assert normalize(text, "zh") == spoken


@pytest.mark.parametrize(("text", "spoken"), EN_CASES)
def test_english(text: str, spoken: str) -> None:
    assert normalize_en(text) == spoken
    assert normalize(text, "en") == spoken


def test_the_tables_are_big_enough() -> None:
    assert len(ZH_CASES) >= 40 and len(EN_CASES) >= 20


def test_text_without_numbers_or_symbols_is_left_alone() -> None:
    for text in ("今天天气怎么样？", "好的，没问题。", "What is the weather like today?"):
        assert normalize(text, "zh" if "天" in text or "好" in text else "en") == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=list("0123456789:.-/%℃°$¥€,+=~年月日号点分元个第 ") + list("天气abcXY"), max_size=40))
def test_no_digit_survives_and_nothing_raises(text: str) -> None:
    for lang in ("zh", "en"):
        out = normalize(text, lang)
        assert not any(char.isdigit() for char in out), (text, lang, out)
