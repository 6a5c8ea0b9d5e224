"""Built-in bilingual demo data: small, deterministic, written for polyfast.

Records cover English and Chinese, single- and multi-turn tracks, the three response families
(assistant, qa, dialogue) and all four length bins, spread over 20 buckets whose sizes differ by
more than 10x, as real PolyAlign data does. The text is composed from short topic facts, so a tiny
model can learn it on a laptop CPU in a minute; it carries no meaning beyond that.
"""

from __future__ import annotations

import dataclasses
import random

from .records import Record, make_record
from . import text as T

# (language, track, family, length_bin) -> number of records (before the train/val/test split)
DEMO_BUCKETS: dict[tuple[str, str, str, str], int] = {
    ("en", "single", "qa", "short"): 150,
    ("en", "single", "qa", "medium"): 90,
    ("en", "single", "assistant", "short"): 60,
    ("en", "single", "assistant", "medium"): 110,
    ("en", "single", "assistant", "long"): 40,
    ("en", "single", "assistant", "xlong"): 12,
    ("en", "multi", "dialogue", "short"): 100,
    ("en", "multi", "dialogue", "medium"): 30,
    ("en", "multi", "qa", "short"): 70,
    ("en", "multi", "qa", "long"): 14,
    ("zh", "single", "qa", "short"): 120,
    ("zh", "single", "qa", "medium"): 50,
    ("zh", "single", "assistant", "short"): 40,
    ("zh", "single", "assistant", "medium"): 80,
    ("zh", "single", "assistant", "long"): 30,
    ("zh", "single", "assistant", "xlong"): 12,
    ("zh", "multi", "dialogue", "short"): 90,
    ("zh", "multi", "dialogue", "medium"): 24,
    ("zh", "multi", "qa", "short"): 40,
    ("zh", "single", "dialogue", "short"): 20,
}

_TARGETS = {"short": (6, 38), "medium": (45, 115), "long": (125, 230), "xlong": (245, 270)}

# topic: (English name, Chinese name, English facts, Chinese facts)
_TOPICS = {
    "tea": ("tea", "茶", [
        "Green tea is steamed or pan-fired soon after picking, which keeps its leaves green.",
        "Black tea is fully oxidised, so it tastes stronger and keeps longer.",
        "Water just below boiling suits most black teas.",
        "Green tea is best brewed with water at about eighty degrees.",
        "A second infusion often brings out sweeter notes."], [
        "绿茶采摘后很快杀青，所以叶子保持绿色。", "红茶经过完全发酵，味道更浓，也更耐储存。",
        "冲泡红茶适合用接近沸腾的水。", "绿茶最好用八十度左右的水冲泡。", "第二泡常常带出更甜的味道。"]),
    "bikes": ("cycling", "骑车", [
        "Check the tyre pressure before every long ride.",
        "A chain that is cleaned and oiled lasts much longer.",
        "Lower gears make steep hills far easier on the knees.",
        "Lights on the front and back are required at night.",
        "A helmet should sit level, two fingers above the eyebrows."], [
        "每次长途骑行前都要检查胎压。", "清洁并上油的链条寿命更长。", "低档位让爬坡时膝盖轻松得多。",
        "夜间骑车前后都需要车灯。", "头盔应该戴正，离眉毛大约两指。"]),
    "bread": ("baking bread", "做面包", [
        "Yeast needs warmth and time to make the dough rise.",
        "Kneading builds gluten, which gives bread its chew.",
        "A hot oven with some steam gives a crisp crust.",
        "Let the loaf cool before slicing so the crumb sets.",
        "Salt slows yeast, so weigh it carefully."], [
        "酵母需要温度和时间才能让面团发起来。", "揉面能形成面筋，让面包有嚼劲。", "高温烤箱加一点蒸汽能烤出脆皮。",
        "面包要放凉再切，组织才会定型。", "盐会减慢酵母活动，要仔细称量。"]),
    "rivers": ("rivers", "河流", [
        "The Yangtze is the longest river in Asia.",
        "Rivers carry silt that builds fertile plains near their mouths.",
        "A delta forms where a river slows down as it meets the sea.",
        "Dams store water but also trap sediment upstream.",
        "Floods in spring often come from melting snow in the mountains."], [
        "长江是亚洲最长的河流。", "河流携带泥沙，在入海口附近形成肥沃的平原。", "河流入海时流速变慢，就会形成三角洲。",
        "水坝可以蓄水，但也会把泥沙拦在上游。", "春天的洪水常常来自山上的融雪。"]),
    "python": ("Python code", "Python 编程", [
        "A list comprehension builds a new list in a single expression.",
        "Use a virtual environment so each project keeps its own packages.",
        "Dictionaries keep their insertion order since Python 3.7.",
        "Tests written with pytest are plain functions that use assert.",
        "Type hints document what a function expects and returns."], [
        "列表推导式可以用一个表达式生成新列表。", "使用虚拟环境，让每个项目拥有自己的依赖包。", "从 Python 3.7 开始，字典保持插入顺序。",
        "pytest 的测试就是使用 assert 的普通函数。", "类型注解说明函数需要什么参数、返回什么结果。"]),
    "sleep": ("sleep", "睡眠", [
        "Most adults need seven to nine hours of sleep.",
        "Screens late at night can delay the feeling of tiredness.",
        "A cool, dark room helps people fall asleep faster.",
        "Going to bed at the same time each night steadies the body clock.",
        "Coffee in the afternoon can still affect sleep at night."], [
        "大多数成年人需要七到九个小时的睡眠。", "深夜看屏幕会推迟困意。", "凉爽黑暗的房间能帮助人更快入睡。",
        "每天同一时间上床能稳定生物钟。", "下午喝咖啡，晚上仍可能影响睡眠。"]),
}

_EN_Q = ["What should I know about {t}?", "Can you tell me something about {t}?",
         "Why does this matter for {t}?", "Give me one tip about {t}.", "How do people get {t} right?"]
_ZH_Q = ["关于{t}，我应该知道什么？", "能给我讲讲{t}吗？", "{t}有什么要注意的？", "给我一个关于{t}的建议。", "怎样才能做好{t}？"]
_EN_ASSIST = ["Explain {t} to a beginner.", "Write a short guide to {t}.", "Summarise the basics of {t}."]
_ZH_ASSIST = ["请向初学者解释{t}。", "写一份{t}的简短指南。", "总结一下{t}的基本知识。"]
_EN_CHAT = ["Ha, I tried that last week.", "Really? I never knew that.", "Sounds good to me.",
            "That reminds me of my uncle.", "Okay, and then what?"]
_ZH_CHAT = ["哈哈，我上周刚试过。", "真的吗？我以前不知道。", "听起来不错。", "这让我想起了我叔叔。", "好的，然后呢？"]
_EN_LINK = ["Also,", "In short,", "On top of that,", "For example,", "That said,", "Remember:"]
_ZH_LINK = ["另外，", "简单来说，", "除此之外，", "比如说，", "不过，", "记住："]


def _compose(rng: random.Random, lang: str, facts: list[str], lo: int, hi: int) -> str:
    """Join facts (with linking words, in paragraphs) until the token count lands in [lo, hi]."""
    target = rng.randint(lo, hi)
    links = _EN_LINK if lang == "en" else _ZH_LINK
    sep = " " if lang == "en" else ""
    out: list[str] = []
    pool: list[str] = []
    while True:
        if not pool:  # draw facts without replacement, reshuffling when all were used
            pool = rng.sample(facts, len(facts))
        fact = pool.pop()
        if out and rng.random() < 0.5:
            link = rng.choice(links)
            fact = f"{link} {fact[0].lower()}{fact[1:]}" if lang == "en" else link + fact
        candidate = out + [fact]
        n = T.token_count(sep.join(candidate))
        if n > hi:
            if out and T.token_count(sep.join(out)) >= lo:
                break
            continue  # try a shorter fact
        out = candidate
        if n >= target:
            break
    # paragraphs of about four sentences for the longer answers
    paras = [sep.join(out[i:i + 4]) for i in range(0, len(out), 4)]
    return "\n\n".join(paras)


def _make(rng: random.Random, idx: int, lang: str, track: str, family: str, bin_: str) -> Record:
    topic = rng.choice(sorted(_TOPICS))
    name_en, name_zh, facts_en, facts_zh = _TOPICS[topic]
    en = lang == "en"
    name, facts = (name_en, facts_en) if en else (name_zh, facts_zh)
    lo, hi = _TARGETS[bin_]
    context = ""
    if family == "assistant":
        question = rng.choice(_EN_ASSIST if en else _ZH_ASSIST).format(t=name)
    elif family == "qa":
        question = rng.choice(_EN_Q if en else _ZH_Q).format(t=name)
        context = (" " if en else "").join(rng.sample(facts, 3))
    else:
        question = rng.choice(_EN_CHAT if en else _ZH_CHAT)
    response = _compose(rng, lang, facts, lo, hi)
    if family == "dialogue" and bin_ == "short":
        response = rng.choice(_EN_CHAT if en else _ZH_CHAT) + (" " if en else "") + response
        while T.token_count(response) > hi:  # keep the bin honest
            response = response.rsplit(" " if en else "。", 1)[0]
    history = []
    if track == "multi":
        for _ in range(rng.randint(1, 3)):
            user = rng.choice(_EN_Q if en else _ZH_Q).format(t=name)
            history.append((user, rng.choice(facts)))
    style = {"assistant": "assistant_like", "qa": "qa_search", "dialogue": "open_chat"}[family]
    return make_record(id=f"demo-{lang}-{idx:05d}", response=response, question=question,
                       context=context, history=history, language=lang, track=track, family=family,
                       style=style)


def demo_records(split: str = "train", seed: int = 0) -> list[Record]:
    """The built-in demo records of one split: "train" (80%), "val" (10%), "test" (10%) or "all".

    Deterministic for a given seed; every bucket has at least one record in each split.
    """
    if split not in ("train", "val", "test", "all"):
        raise ValueError(f"split must be train, val, test or all, got {split!r}")
    rng = random.Random(seed)
    out, idx = [], 0
    for (lang, track, family, bin_), count in DEMO_BUCKETS.items():
        n_hold = max(1, round(0.1 * count))
        for k in range(count):
            rec = _make(rng, idx, lang, track, family, bin_)
            idx += 1
            assert rec.length_bin == bin_, (rec.bucket_id, bin_, rec.response)
            part = "val" if k < n_hold else "test" if k < 2 * n_hold else "train"
            if split in ("all", part):
                out.append(dataclasses.replace(rec, split=part))
    return out
