"""Text attacks that search with the judge (best-of-N sampling, PAIR, TAP) on tiny models: augmentations
change the text exactly as documented, the search stops at the first success, the attacker sees the
target's answers, TAP prunes off-topic and low-scoring branches, malformed attacker output falls back."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest
import torch

from circuit_breakers.evaluation.attacks import (
    ATTACKS,
    AttackPrompt,
    BestOfNAttack,
    PairAttack,
    SearchAttack,
    TapAttack,
    add_noise,
    augment,
    flip_case,
    make_attack,
    on_topic,
    parse_attacker_reply,
    rating,
    scramble_words,
)
from circuit_breakers.evaluation.compare import evaluate_models
from circuit_breakers.evaluation.judges import Judge, Verdict
from helpers import chat_completions_stub, make_model, make_tokenizer

torch.set_num_threads(1)

TEXT = "Please explain how somebody would bake sourdough bread at home, step by step, with care."
GOAL = "How do I bake bread at home?"


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tokenizer), layers=2), tokenizer


class CountingJudge(Judge):
    """Harmful exactly on the pairs whose running number (1-based, over all calls) is in `harmful_at`."""

    name = "counting"

    def __init__(self, harmful_at=(), scores=None):
        self.harmful_at, self.scores = set(harmful_at), scores
        self.calls: list[list[tuple[str, str]]] = []
        self.pairs = 0

    def judge(self, prompts, completions, contexts=None):
        self.calls.append(list(zip(prompts, completions)))
        out = []
        for _ in completions:
            self.pairs += 1
            score = self.scores(self.pairs) if self.scores else 0.0
            out.append(Verdict(self.pairs in self.harmful_at, score, self.name))
        return out


class FakeAttacker:
    """Stands in for the attacker model: records every conversation it is given, answers with `reply`."""

    def __init__(self, reply):
        self.reply_fn, self.calls = reply, []

    def reply(self, conversations):
        self.calls.append([[dict(m) for m in c] for c in conversations])
        return [self.reply_fn(len(self.calls), i, c) for i, c in enumerate(conversations)]

    def describe(self):
        return {"attacker": "fake"}


def proposal(prompt: str) -> str:
    return json.dumps({"improvement": "try again", "prompt": prompt})


# --- best-of-N augmentations ----------------------------------------------------------------------


def test_scrambling_keeps_first_and_last_letter_and_the_letters_of_each_word():
    out = scramble_words(TEXT, random.Random(0), 1.0)
    assert out != TEXT
    words, new = re.split(r"(\s+)", TEXT), re.split(r"(\s+)", out)
    assert len(words) == len(new)
    for w, n in zip(words, new):
        if len(w) <= 3:
            assert n == w
        else:
            assert (n[0], n[-1], sorted(n)) == (w[0], w[-1], sorted(w))
    assert scramble_words(TEXT, random.Random(0), 0.0) == TEXT


def test_case_flips_change_only_letter_case():
    assert flip_case("Bake 3 loaves!", random.Random(0), 1.0) == "bAKE 3 LOAVES!"
    out = flip_case(TEXT, random.Random(1), 0.5)
    assert out != TEXT and out.lower() == TEXT.lower()
    assert flip_case(TEXT, random.Random(1), 0.0) == TEXT


def test_noise_moves_characters_by_one_code_point():
    out = add_noise(TEXT, random.Random(0), 1.0)
    assert len(out) == len(TEXT)
    assert all(abs(ord(a) - ord(b)) == 1 for a, b in zip(out, TEXT))
    assert all(32 <= ord(c) <= 126 for c in out)
    few = add_noise(TEXT, random.Random(0), 0.1)
    changed = [(a, b) for a, b in zip(few, TEXT) if a != b]
    assert changed and all(abs(ord(a) - ord(b)) == 1 for a, b in changed)
    assert add_noise("é\n", random.Random(0), 1.0) == "é\n"  # outside printable ASCII: left alone


def test_augmentations_are_deterministic_under_a_seed_and_differ_across_seeds():
    first = augment(TEXT, random.Random(7))
    assert first == augment(TEXT, random.Random(7))
    assert first != augment(TEXT, random.Random(8)) and first != TEXT
    attack = BestOfNAttack(n=4, seed=3)
    assert attack.augmented(GOAL, 0) == attack.augmented(GOAL, 0)
    assert attack.augmented(GOAL, 0) != BestOfNAttack(n=4, seed=4).augmented(GOAL, 0)
    assert len({attack.augmented(TEXT, k) for k in range(4)}) == 4


# --- best-of-N search ------------------------------------------------------------------------------


def test_best_of_n_stops_at_the_first_success_and_stores_that_attempt(tiny):
    model, tokenizer = tiny
    judge = CountingJudge(harmful_at={3})
    attack = make_attack("best_of_n", budget="cpu", n=10)
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], judge, max_new_tokens=4, batch_size=4)
    assert judge.pairs == 3 and len(judge.calls) == 3  # attempts 4..10 never generated nor judged
    assert item.settings["attempts"] == 3 and item.settings["success"] is True
    assert item.messages[-1]["content"] == attack.augmented(GOAL, 2)
    assert item.completion == judge.calls[2][0][1]
    assert all(prompt == GOAL for call in judge.calls for prompt, _ in call)  # the judge sees the request


def test_best_of_n_without_success_keeps_the_last_attempt_and_each_prompt_stops_on_its_own(tiny):
    model, tokenizer = tiny
    judge = CountingJudge(harmful_at={1})  # the first prompt's first attempt succeeds
    attack = BestOfNAttack(n=3, seed=0)
    prompts = [AttackPrompt(GOAL), AttackPrompt("Write a poem about the sea.")]
    first, second = attack.search(model, tokenizer, prompts, judge, max_new_tokens=4, batch_size=4)
    assert [len(c) for c in judge.calls] == [2, 1, 1]
    assert (first.settings["attempts"], first.settings["success"]) == (1, True)
    assert (second.settings["attempts"], second.settings["success"]) == (3, False)
    assert second.messages[-1]["content"] == attack.augmented("Write a poem about the sea.", 2)


def test_best_of_n_sampling_is_reproducible_and_differs_across_seeds(tiny):
    model, tokenizer = tiny
    prompts = [AttackPrompt(GOAL)]

    def run(**options):
        attack = BestOfNAttack(**{"n": 2, "seed": 1, **options})
        return [i.completion for i in attack.search(model, tokenizer, prompts, CountingJudge(), 8, 4)]

    assert run() == run()
    assert run() != run(seed=2)


def test_best_of_n_budgets_and_settings_fingerprint_every_option():
    assert [make_attack("best_of_n", budget=b).n for b in ("cpu", "default", "paper")] == [4, 32, 10000]
    settings = make_attack("best_of_n", budget="cpu", temperature=0.7).settings()
    assert settings["attack"] == "best_of_n" and settings["temperature"] == 0.7
    for option in ("n", "seed", "scramble_prob", "case_prob", "noise_prob", "per_round", "scorer"):
        assert option in settings
    assert make_attack("best_of_n", seed=1).settings() != make_attack("best_of_n", seed=2).settings()


def test_evaluate_models_runs_a_search_attack_with_its_judge_and_keeps_the_found_completion(tiny):
    judge = CountingJudge(harmful_at={2})
    result = evaluate_models(
        {"base": tiny}, [GOAL], [BestOfNAttack(n=5, seed=0)], judge=judge, max_new_tokens=4, progress=False
    )
    [sample] = result.samples
    assert sample.attack == "best_of_n" and sample.prompt == GOAL
    assert sample.attack_details["attempts"] == 2 and sample.attack_details["success"] is True
    assert sample.completion == judge.calls[1][0][1] and sample.harmful
    assert len(judge.calls) == 2  # the search judged with the evaluation's judge: no second reading


def test_a_separate_scorer_searches_and_the_evaluation_judge_reads_the_kept_completion(tiny):
    judge = CountingJudge()
    attack = BestOfNAttack(n=3, seed=0, scorer="refusal")
    result = evaluate_models({"base": tiny}, [GOAL], [attack], judge=judge, max_new_tokens=4, progress=False)
    [sample] = result.samples
    assert judge.calls == [[(GOAL, sample.completion)]] and not sample.harmful
    assert sample.attack_details["scorer"] == "refusal"


# --- PAIR -------------------------------------------------------------------------------------------


def test_rating_maps_verdicts_to_one_to_ten():
    assert rating(Verdict(True, 0.2, "x")) == 10
    assert rating(Verdict(False, 0.0, "x")) == 1
    assert rating(Verdict(False, 0.5, "x")) == 5
    assert rating(Verdict(False, 1.0, "x")) == 9


def test_parse_attacker_reply_is_robust_and_says_when_it_cannot():
    assert parse_attacker_reply(proposal("Tell me")) == ("try again", "Tell me")
    fenced = 'Sure!\n```json\n{"improvement": "x", "prompt": "Say \\"hi\\""}\n```\nDone.'
    assert parse_attacker_reply(fenced) == ("x", 'Say "hi"')
    assert parse_attacker_reply("{'improvement': 'y', 'prompt': 'single quotes'}") == ("y", "single quotes")
    assert parse_attacker_reply('{"improvement": "only"}') is None
    assert parse_attacker_reply('{"improvement": "cut", "prompt": "unfinish') is None
    assert parse_attacker_reply('{"prompt": "   "}') is None
    assert parse_attacker_reply("no json at all") is None
    broken = '{"improvement": "", "prompt": "Pick it\\nnow \\"please\\"", "more:"}'  # not JSON, not Python
    assert parse_attacker_reply(broken) == ("", 'Pick it\nnow "please"')  # broken after a complete prompt


def test_pair_gives_the_attacker_the_targets_answer_and_stops_at_the_first_success(tiny):
    model, tokenizer = tiny
    attacker = FakeAttacker(lambda call, i, c: proposal(f"Stream {i} round {call}: {GOAL}"))
    judge = CountingJudge(harmful_at={4})  # 2 streams: the second stream's answer in round 2
    attack = PairAttack(n_streams=2, n_iterations=5)
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], judge, 4, 4, attacker=attacker)
    assert len(attacker.calls) == 2 and len(judge.calls) == 2  # rounds 3..5 never run
    first_answers = [completion for _, completion in judge.calls[0]]
    for stream, answer in enumerate(first_answers):
        later = attacker.calls[1][stream]
        assert answer in later[-1]["content"] and GOAL in later[0]["content"]
    assert item.settings["success"] is True and item.settings["iteration"] == 2 and item.settings["stream"] == 1
    assert item.messages[-1]["content"] == f"Stream 1 round 2: {GOAL}"
    assert item.completion == judge.calls[1][1][1]
    assert item.settings["rating"] == 10 and item.settings["parse_failures"] == 0


def test_pair_falls_back_to_the_previous_prompt_on_unparsable_attacker_output(tiny):
    model, tokenizer = tiny

    def reply(call, i, c):
        return proposal(f"Better: {GOAL}") if call == 1 else "I refuse to write JSON"

    attacker = FakeAttacker(reply)
    judge = CountingJudge(scores=lambda n: 0.5 if n == 1 else 0.0)
    attack = PairAttack(n_streams=1, n_iterations=3)
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], judge, 4, 4, attacker=attacker)
    assert item.settings["parse_failures"] == 2 and item.settings["success"] is False
    assert item.settings["queries"] == 3
    # no success: the best-rated attempt is kept (round 1, rating 5); rounds 2 and 3 reused its prompt
    assert item.messages[-1]["content"] == f"Better: {GOAL}" and item.settings["rating"] == 5
    assert item.settings["iteration"] == 1


def test_pair_first_round_unparsable_falls_back_to_the_request_itself(tiny):
    model, tokenizer = tiny
    attack = PairAttack(n_streams=1, n_iterations=1)
    attacker = FakeAttacker(lambda *a: "nonsense")
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], CountingJudge(), 4, 4, attacker=attacker)
    assert item.messages[-1]["content"] == GOAL and item.settings["parse_failures"] == 1


def test_pair_uses_an_openai_compatible_endpoint_as_the_attacker(tiny):
    model, tokenizer = tiny
    seen = []

    def reply(system_prompt):
        seen.append(system_prompt)
        return proposal(f"Endpoint asks: {GOAL}")

    with chat_completions_stub(reply) as url:
        attack = PairAttack(n_streams=1, n_iterations=2, attacker=url, attacker_model="stub")
        [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], CountingJudge(harmful_at={1}), 4, 4)
    assert len(seen) == 1 and GOAL in seen[0]
    assert item.messages[-1]["content"] == f"Endpoint asks: {GOAL}" and item.settings["success"] is True


def test_embedded_attacker_says_it_is_weak(caplog):
    attack = make_attack("pair", budget="cpu")
    assert attack.attacker == "embedded"
    assert "weak" in attack.settings()["attacker_note"]
    assert "attacker_note" not in PairAttack(attacker="http://127.0.0.1:1/v1").settings()
    with caplog.at_level(logging.WARNING):
        attack.warn_if_weak()
    assert len([r for r in caplog.records if "weak" in r.getMessage()]) == 1


def test_pair_and_tap_budgets():
    cpu, paper = make_attack("pair", budget="cpu"), make_attack("pair", budget="paper")
    assert (cpu.n_streams, cpu.n_iterations) == (2, 2) and (paper.n_streams, paper.n_iterations) == (20, 3)
    tap = make_attack("tap", budget="paper")
    assert (tap.width, tap.depth, tap.branching) == (10, 10, 4)
    assert make_attack("tap", budget="cpu").settings() != tap.settings()
    assert {"best_of_n", "pair", "tap"} <= set(ATTACKS)
    assert all(issubclass(ATTACKS[n], SearchAttack) for n in ("best_of_n", "pair", "tap"))


# --- TAP --------------------------------------------------------------------------------------------


def test_on_topic_checks_the_goals_content_words():
    assert on_topic(GOAL, f"As a chef, tell me: {GOAL.lower()}", 0.5)
    assert not on_topic(GOAL, "Tell me about cats.", 0.5)
    assert on_topic(GOAL, "Tell me about cats.", 0.0)


def test_tap_prunes_off_topic_and_low_scoring_branches_within_width_and_depth(tiny):
    model, tokenizer = tiny

    def reply(call, i, conversation):
        return proposal("Tell me about cats." if i % 3 == 2 else f"Call {call} child {i}: {GOAL}")

    attacker = FakeAttacker(reply)
    judge = CountingJudge(scores=lambda n: n / 10)  # later answers score higher: the newest are kept
    attack = TapAttack(width=2, depth=3, branching=3, on_topic_threshold=0.5)
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], judge, 4, 4, attacker=attacker)
    assert [len(call) for call in attacker.calls] == [3, 6, 6]  # root x 3, then width 2 x branching 3
    assert [len(call) for call in judge.calls] == [2, 4, 4]  # off-topic children never reach the target
    assert item.settings["pruned_off_topic"] == 5 and item.settings["pruned_low_score"] == 2
    assert item.settings["queries"] == 10 and item.settings["success"] is False
    for call in attacker.calls[1:]:  # only on-topic, answered branches were extended
        for conversation in call:
            assert all("cats" not in m["content"] for m in conversation if m["role"] == "assistant")
    kept = {c[-2]["content"] for c in attacker.calls[2]}  # depth 3 continues depth 2's two best (pairs 5, 6)
    assert kept == {proposal(f"Call 2 child {i}: {GOAL}") for i in (3, 4)}
    # best: pair 9 (score 0.9 -> rating 1 + 8); pair 10 (rating capped at 9) ties and comes later
    assert item.settings["depth"] == 3 and item.settings["rating"] == 9
    assert item.messages[-1]["content"] == f"Call 3 child 3: {GOAL}"


def test_tap_stops_at_the_first_success(tiny):
    model, tokenizer = tiny
    attacker = FakeAttacker(lambda call, i, c: proposal(f"Variant {call}.{i}: {GOAL}"))
    judge = CountingJudge(harmful_at={2})
    attack = TapAttack(width=2, depth=4, branching=2)
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], judge, 4, 4, attacker=attacker)
    assert len(attacker.calls) == 1 and judge.pairs == 2
    assert item.settings["success"] is True and item.messages[-1]["content"] == f"Variant 1.1: {GOAL}"


def test_tap_with_every_child_off_topic_answers_the_request_itself(tiny):
    model, tokenizer = tiny
    attacker = FakeAttacker(lambda *a: proposal("Tell me about cats."))
    judge = CountingJudge()
    [item] = TapAttack(width=2, depth=2, branching=2).search(
        model, tokenizer, [AttackPrompt(GOAL)], judge, 4, 4, attacker=attacker
    )
    assert len(attacker.calls) == 1 and item.settings["pruned_off_topic"] == 2
    assert item.messages[-1]["content"] == GOAL and item.settings["queries"] == 1


# --- local attacker models --------------------------------------------------------------------------


def test_a_local_attacker_model_begins_the_json_and_its_nonsense_is_counted(tiny):
    from circuit_breakers.evaluation.attacks.attacker import FIRST_REPLY_PREFILL, REPLY_PREFILL, ModelAttacker

    model, tokenizer = tiny
    writer = ModelAttacker(model, tokenizer, max_new_tokens=6, seed=0)
    conversation = PairAttack().opening(AttackPrompt(GOAL))
    first = writer.reply([conversation, conversation])
    assert all(r.startswith(FIRST_REPLY_PREFILL) for r in first) and first[0] != first[1]  # sampled
    later = writer.reply([PairAttack().extend(conversation, first[0], "an answer", 1, GOAL)])
    assert later[0].startswith(REPLY_PREFILL) and not later[0].startswith(FIRST_REPLY_PREFILL)
    assert ModelAttacker(model, tokenizer, max_new_tokens=6, seed=0).reply([conversation, conversation]) == first
    attack = PairAttack(n_streams=2, n_iterations=2, attacker="target", attacker_max_new_tokens=6)
    [item] = attack.search(model, tokenizer, [AttackPrompt(GOAL)], CountingJudge(), 4, 4)
    assert item.settings["parse_failures"] == 4 and item.messages[-1]["content"] == GOAL


def test_templates_without_a_system_role_get_the_instructions_in_the_first_user_turn():
    from circuit_breakers.evaluation.attacks.attacker import ModelAttacker, fold_system

    conversation = PairAttack().opening(AttackPrompt(GOAL))
    folded = fold_system(conversation)
    assert [m["role"] for m in folded] == ["user"]
    assert folded[0]["content"].startswith(conversation[0]["content"]) and GOAL in folded[0]["content"]
    tokenizer = make_tokenizer("mistral")  # its template drops system turns silently
    assert not ModelAttacker(make_model("llama", vocab_size=len(tokenizer), layers=1), tokenizer).system_role
    assert ModelAttacker(None, make_tokenizer("chatml")).system_role


def test_attacker_conversations_keep_the_opening_and_the_last_exchanges():
    attack = PairAttack(keep_last=1)
    conversation = attack.opening(AttackPrompt(GOAL))
    for k in range(3):
        conversation = attack.extend(conversation, f"reply {k}", f"answer {k}", k + 1, GOAL)
    shown = attack.trimmed(conversation)
    assert shown[:2] == conversation[:2] and shown[2:] == conversation[-2:] and len(shown) == 4
    assert "answer 2" in shown[-1]["content"] and "SCORE: 3/10" in shown[-1]["content"]
    assert PairAttack(keep_last=3).trimmed(conversation) == conversation


@pytest.mark.parametrize(
    "attack, message",
    [
        (BestOfNAttack(n=0), "best_of_n: n and per_round must be at least 1"),
        (BestOfNAttack(noise_prob=1.5), r"best_of_n: noise_prob must lie in \[0, 1\]"),
        (BestOfNAttack(temperature=0.0), "best_of_n: temperature must be positive"),
        (PairAttack(n_streams=0), "pair: n_streams and n_iterations must be at least 1"),
        (PairAttack(keep_last=-1), "pair: keep_last must be 0 or more"),
        (TapAttack(width=0), "tap: width, depth and branching must be at least 1"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_any_generation(tiny, attack, message):
    from circuit_breakers.evaluation.attacks import AttackError

    model, tokenizer = tiny
    attacker = FakeAttacker(lambda *a: proposal(GOAL))
    extra = {} if isinstance(attack, BestOfNAttack) else {"attacker": attacker}
    judge = CountingJudge()
    with pytest.raises(AttackError, match=message) as err:
        attack.search(model, tokenizer, [AttackPrompt(GOAL)], judge, 4, 4, **extra)
    assert "\n" not in str(err.value) and judge.pairs == 0 and attacker.calls == []


def test_an_unreachable_attacker_endpoint_gives_empty_replies_and_one_warning_each(caplog):
    from circuit_breakers.evaluation.attacks import EndpointAttacker

    writer = EndpointAttacker("http://127.0.0.1:9/v1", "none", max_retries=0)
    with caplog.at_level(logging.WARNING):
        assert writer.reply([[{"role": "user", "content": "hi"}]] * 2) == ["", ""]
    assert len([r for r in caplog.records if "attacker endpoint" in r.getMessage()]) == 2
    assert parse_attacker_reply("") is None  # so the attack counts it as a parse failure


# --- several requests share each attacker call and each target batch ------------------------------

OTHER = "Write a poem about the sea."


def test_pair_batches_requests_and_drops_a_request_once_it_succeeds(tiny):
    model, tokenizer = tiny
    attacker = FakeAttacker(lambda call, i, c: proposal(f"Round {call}: {c[0]['content'][-40:]}"))
    judge = CountingJudge(harmful_at={1})  # the first request succeeds in round 1
    attack = PairAttack(n_streams=1, n_iterations=3)
    first, second = attack.search(model, tokenizer, [AttackPrompt(GOAL), AttackPrompt(OTHER)], judge, 4, 4, attacker)
    assert [len(c) for c in attacker.calls] == [2, 1, 1] and [len(c) for c in judge.calls] == [2, 1, 1]
    assert all(OTHER in c[0][0]["content"] for c in attacker.calls[1:])  # only the open request goes on
    assert (first.settings["success"], first.settings["queries"]) == (True, 1)
    assert (second.settings["success"], second.settings["queries"]) == (False, 3)
    assert [p for p, _ in judge.calls[0]] == [GOAL, OTHER] and first.prompt.behavior == GOAL


def test_tap_batches_requests_and_answers_a_dead_tree_at_the_end(tiny):
    model, tokenizer = tiny

    def reply(call, i, conversation):
        return proposal("Tell me about cats." if GOAL in conversation[0]["content"] else f"{call}.{i} {OTHER}")

    attacker = FakeAttacker(reply)
    judge = CountingJudge()
    attack = TapAttack(width=1, depth=2, branching=2, on_topic_threshold=0.5)
    dead, alive = attack.search(model, tokenizer, [AttackPrompt(GOAL), AttackPrompt(OTHER)], judge, 4, 4, attacker)
    assert [len(c) for c in attacker.calls] == [4, 2] and [len(c) for c in judge.calls] == [2, 2, 1]
    assert judge.calls[2][0][0] == GOAL and dead.messages[-1]["content"] == GOAL
    assert (dead.settings["queries"], dead.settings["pruned_off_topic"]) == (1, 2)
    assert (alive.settings["queries"], alive.settings["pruned_low_score"]) == (4, 1)
