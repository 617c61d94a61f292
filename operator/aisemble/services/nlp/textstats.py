"""Text statistics and a language hint, in plain Python: no model, no extra dependency.

The language hint is a hint: the script of the letters narrows the candidates
(kana means Japanese, Hangul Korean, ...), and within a script shared by
several languages (Latin, Cyrillic) the language whose most common words the
text uses most wins. That reads ordinary sentences right and short or mixed
texts with low confidence, which is what `confidence` is for.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# The most common words of each language written in a script shared by
# several; a handful of them recur in any sentence of a few words.
_COMMON_WORDS = {
    "en": "the of and to a in is it that was for on are with as i be at by this have from "
    "or not but what all were we when your can there an which their if do will each how "
    "they he she you has had been would",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als "
    "auch es an werden aus er hat dass sie nach wird bei einer um am sind noch wie einem "
    "über so zum war ich",
    "fr": "le la les de des et un une du en est que qui dans pour pas au sur il elle ne ce "
    "avec par plus se sont nous vous je ont mais ou cette aux été son sa",
    "es": "el la los las de del y en un una que es por con para no se lo al como más pero "
    "sus su le ya o este está son muy también fue ha yo",
    "it": "il lo la i gli le di del della e un una che è per non in con si da al alla sono "
    "come ma anche più questo questa ha nel io",
    "pt": "o a os as de do da dos das e um uma que é em no na não com por para se mais como "
    "mas foi ao ele ela são também muito está eu",
    "nl": "de het een en van in is dat op te zijn met voor niet aan er die ook als bij door "
    "maar om dan nog wel naar uit ik",
    "ru": "и в не на я что он с как а то это по но его все она так к у же вы за бы от из "
    "мы было только был",
    "uk": "і в не на я що він з як а це та по але його все вона так до у же ви за би від "
    "із ми було тільки був є",
}
_COMMON = {code: frozenset(words.split()) for code, words in _COMMON_WORDS.items()}

_NAMES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "ru": "Russian",
    "uk": "Ukrainian",
    "ja": "Japanese",
    "zh": "Chinese",
    "ko": "Korean",
    "el": "Greek",
    "ar": "Arabic",
    "he": "Hebrew",
    "hi": "Hindi",
    "th": "Thai",
    "und": "undetermined",
}
# Which languages each script suggests; the common words decide among several.
_BY_SCRIPT = {
    "Latin": ("en", "de", "fr", "es", "it", "pt", "nl"),
    "Cyrillic": ("ru", "uk"),
    "Greek": ("el",),
    "Arabic": ("ar",),
    "Hebrew": ("he",),
    "Devanagari": ("hi",),
    "Thai": ("th",),
    "Hangul": ("ko",),
    "Han": ("zh",),
    "Japanese": ("ja",),
}
_UNICODE_SCRIPTS = (
    "LATIN",
    "CYRILLIC",
    "GREEK",
    "ARABIC",
    "HEBREW",
    "DEVANAGARI",
    "THAI",
    "HANGUL",
    "HIRAGANA",
    "KATAKANA",
)
# Scripts written without spaces: a run of letters is split where the script
# changes (kanji to kana), which approximates Japanese words surprisingly well;
# Han without kana (Chinese) counts a word per character.
_UNSPACED = frozenset({"Han", "Hiragana", "Katakana", "Thai"})
_KANA = frozenset({"Hiragana", "Katakana"})
# Below this many common words, a verdict among same-script languages is shaky.
_ENOUGH_EVIDENCE = 4

_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_SENTENCE_END = re.compile(r"[.!?…]+(?=\s|$)|[。！？]+")


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, or "und"
    name: str
    script: str | None
    confidence: float


@dataclass(frozen=True)
class Stats:
    characters: int
    words: int
    sentences: int
    language: Language


def stats(text: str) -> Stats:
    words = _words(text)
    return Stats(
        characters=len(text),
        words=len(words),
        sentences=sum(1 for part in _SENTENCE_END.split(text) if _WORD.search(part)),
        language=language(text, words),
    )


def language(text: str, words: list[str] | None = None) -> Language:
    scripts: dict[str, int] = {}
    for char in text:
        if char.isalpha():
            script = _script(char)
            scripts[script] = scripts.get(script, 0) + 1
    letters = sum(scripts.values())
    if not letters:
        return Language("und", _NAMES["und"], None, 0.0)
    kana = scripts.pop("Hiragana", 0) + scripts.pop("Katakana", 0)
    if kana:  # kana only occur in Japanese, which mixes them with Han
        scripts["Japanese"] = kana + scripts.pop("Han", 0)
    script, count = max(scripts.items(), key=lambda item: item[1])
    share = count / letters
    candidates = _BY_SCRIPT.get(script, ())
    if len(candidates) == 1:
        return Language(candidates[0], _NAMES[candidates[0]], script, round(share, 2))
    if not candidates:
        return Language("und", _NAMES["und"], script, 0.0)
    lowered = [word.lower() for word in (words if words is not None else _words(text))]
    hits = {code: sum(word in _COMMON[code] for word in lowered) for code in candidates}
    best = max(candidates, key=lambda code: hits[code])
    if not hits[best]:
        return Language("und", _NAMES["und"], script, 0.0)
    # How clearly the winner beats the others, times how much evidence there is.
    clarity = hits[best] / sum(hits.values())
    evidence = min(1.0, hits[best] / _ENOUGH_EVIDENCE)
    return Language(best, _NAMES[best], script, round(share * clarity * evidence, 2))


def _words(text: str) -> list[str]:
    words = []
    for match in _WORD.finditer(text):
        word = match.group()
        scripts = [_script(char) for char in word]
        if _UNSPACED.isdisjoint(scripts):
            words.append(word)
        else:
            words.extend(_script_runs(word, scripts, split_han=_KANA.isdisjoint(scripts)))
    return words


def _script_runs(word: str, scripts: list[str], split_han: bool) -> list[str]:
    runs: list[str] = []
    previous = None
    for char, script in zip(word, scripts, strict=True):
        if runs and script == previous and not (split_han and script == "Han"):
            runs[-1] += char
        else:
            runs.append(char)
        previous = script
    return runs


def _script(char: str) -> str:
    name = unicodedata.name(char, "")
    if name.startswith("CJK") or "IDEOGRAPH" in name:
        return "Han"
    if name == "KATAKANA-HIRAGANA PROLONGED SOUND MARK":
        return "Katakana"
    for script in _UNICODE_SCRIPTS:
        if script in name:
            return script.capitalize()
    if char.isdigit():
        return "Digit"
    return "Other"
