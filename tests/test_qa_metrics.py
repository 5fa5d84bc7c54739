"""SQuAD v2.0 and TriviaQA metrics against hand-computed values on real questions."""
from __future__ import annotations

import pytest

from longlm.data.qa import QAExample, load_squad
from longlm.evaluation.qa_metrics import (
    exact_match,
    f1,
    normalize_answer,
    normalize_triviaqa,
    score_predictions,
    squad_scores,
    triviaqa_f1,
    triviaqa_scores,
)
from tests.paths import SQUAD2_DEV, requires_qa_data


@pytest.fixture(scope="module")
def by_id() -> dict[str, QAExample]:
    return {example.id: example for example in load_squad(SQUAD2_DEV)}


def test_normalization_drops_case_punctuation_articles_and_extra_spaces():
    assert normalize_answer("  The Quick,  brown FOX! ") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("U.S. rock-and-roll") == "us rockandroll"  # SQuAD deletes punctuation
    assert normalize_answer("Zachęta theatre") == "zachęta theatre"  # only whole-word articles, letters kept
    assert normalize_triviaqa("U.S. rock-and-roll") == "u s rock and roll"  # TriviaQA replaces it with spaces
    assert normalize_triviaqa("‘The Beatles’") == "beatles" and normalize_triviaqa("Sunset_Blvd.") == "sunset blvd"


def test_exact_match_and_f1_on_single_pairs():
    assert exact_match("the English.", "English") == 1 and f1("the English.", "English") == 1.0
    # gold 5 tokens (fully funded by private parties), prediction 4 (funded by private individuals), 3 shared:
    # precision 3/4, recall 3/5, F1 = 2 * 0.75 * 0.6 / 1.35 = 2/3
    assert exact_match("funded by private individuals", "fully funded by private parties") == 0
    assert f1("funded by private individuals", "fully funded by private parties") == pytest.approx(2 / 3)
    assert f1("", "") == 1.0 and f1("", "English") == 0.0 and f1("English", "") == 0.0
    assert f1("the", "") == 1.0  # "the" normalises to nothing, as in the official script
    # a repeated token matches only as often as the gold has it: precision 1/2, recall 1
    assert f1("Warsaw Warsaw", "Warsaw") == pytest.approx(2 * 0.5 * 1 / 1.5)


@requires_qa_data
def test_squad_v2_scores_match_hand_computation(by_id):
    ids = ["disfl-2479", "disfl-4957", "disfl-85", "disfl-180", "disfl-1743", "disfl-3827"]
    examples = [by_id[i] for i in ids]
    assert [bool(e.answers) for e in examples] == [True, True, True, False, False, True]
    assert examples[1].answers[0]["text"] == "fully funded by private parties"
    predictions = {
        "disfl-2479": "the English.",  # gold "English": EM 1, F1 1
        "disfl-4957": "funded by private individuals",  # EM 0, F1 2/3 (worked out above)
        "disfl-85": "",  # answerable, predicted no-answer: 0, 0
        "disfl-180": "",  # no-answer predicted as such: 1, 1
        "disfl-1743": "Ujazdów Castle",  # text on a no-answer question: 0, 0
        # disfl-3827 missing: counts as "" on an answerable question: 0, 0
    }
    scores = squad_scores(examples, predictions)
    assert scores == pytest.approx({
        "exact": 100 * 2 / 6, "f1": 100 * (1 + 2 / 3 + 1) / 6, "total": 6,
        "HasAns_exact": 100 * 1 / 4, "HasAns_f1": 100 * (1 + 2 / 3) / 4, "HasAns_total": 4,
        "NoAns_exact": 100 * 1 / 2, "NoAns_f1": 100 * 1 / 2, "NoAns_total": 2,
    })
    # na_probs above the threshold score the question as a no-answer prediction
    flipped = squad_scores(examples, predictions, na_probs={"disfl-1743": 1.5, "disfl-2479": 2.0, "disfl-180": 0.9})
    assert flipped["exact"] == pytest.approx(100 * 2 / 6) and flipped["HasAns_exact"] == 0.0 and flipped["NoAns_exact"] == 100.0
    assert score_predictions(examples, predictions) == scores


@requires_qa_data
def test_has_and_no_answer_keys_appear_only_for_present_question_kinds(by_id):
    answerable = [by_id["disfl-2479"], by_id["disfl-3827"]]
    scores = squad_scores(answerable, {"disfl-2479": "English", "disfl-3827": "aided schools"})
    assert set(scores) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}
    assert scores["exact"] == 50.0 and scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # "aided schools" vs "aided"
    assert set(squad_scores([by_id["disfl-180"]], {})) == {"exact", "f1", "total", "NoAns_exact", "NoAns_f1", "NoAns_total"}


def test_squad_takes_the_best_gold_answer_and_ignores_golds_that_normalise_to_nothing():
    example = QAExample("q", "Who won?", "Denver Broncos won .", [
        {"text": "Denver Broncos", "answer_start": 0}, {"text": "Broncos", "answer_start": 7}])
    assert squad_scores([example], {"q": "the Broncos"})["exact"] == 100.0
    article = QAExample("a", "Which?", "the", [{"text": "the", "answer_start": 0}])  # gold becomes [""]
    assert squad_scores([article], {"a": ""})["exact"] == 100.0 and squad_scores([article], {"a": "x"})["exact"] == 0.0


def test_triviaqa_scores_take_the_max_over_aliases():
    # TriviaQA's sample question tc_33 (Sunset Boulevard), with its normalised aliases
    aliases = ["west sunset boulevard", "sunset blvd", "sunset boulevard", "sunset bulevard"]
    example = QAExample("tc_33", "Which Lloyd Webber musical premiered in the US on 10th December 1993?", "", [], aliases=aliases)
    assert triviaqa_scores([example], {"tc_33": "Sunset Blvd."}) == {"exact_match": 100.0, "f1": 100.0, "total": 1}
    # "Sunset Strip" shares one token with each alias: best F1 is against a 2-token alias, P = R = 1/2 -> 0.5
    assert triviaqa_scores([example], {"tc_33": "Sunset Strip"}) == {"exact_match": 0.0, "f1": 50.0, "total": 1}
    other = QAExample("tc_40", "?", "", [], aliases=["beatles"])
    both = triviaqa_scores([example, other], {"tc_33": "The Sunset Boulevard", "tc_40": "the Rolling Stones"})
    assert both == {"exact_match": 50.0, "f1": 50.0, "total": 2}
    assert score_predictions([example, other], {}) == {"exact_match": 0.0, "f1": 0.0, "total": 2}  # missing -> ""
    assert triviaqa_f1("", "the") == 0.0  # TriviaQA's F1 has no empty-equals-empty rule


def test_scoring_without_examples_or_aliases_is_refused():
    with pytest.raises(ValueError, match="squad_scores got no examples"):
        squad_scores([], {})
    with pytest.raises(ValueError, match="^Example 'q' has no aliases; TriviaQA scoring needs its accepted answers.$"):
        triviaqa_scores([QAExample("q", "?", "", [])], {})
