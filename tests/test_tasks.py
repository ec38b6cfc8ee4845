"""The synthetic task family (npr.tasks): problems, verifier, solutions in every style, held-out
split, prompt source, the demo tokenizer."""
from __future__ import annotations

import json
import random

import pytest

from npr import format as fmt
from npr.tasks import TaskPrompts, eval_set, get_task, read_jsonl, task_spec, write_jsonl
from npr.tasks import multiples as gs
from npr.tasks.tokenizer import build_tokenizer


def _brute_answer(text: str) -> int:
    total = 0
    for part in text.split():
        x, n = part.split("=")[1].split("*")
        total += int(x) * int(n) % 10
    return total


@pytest.mark.parametrize("spec", ["multiples", "multiples:k=1-8,n=1-9", "multiples:k=5,n=7"])
def test_problems_answers_and_every_solution_style(spec):
    task = get_task(spec)
    rng = random.Random(spec)
    for _ in range(200):
        p = task.sample(rng)
        assert task.k_min <= p.k <= task.k_max
        assert all(task.n_min <= n <= task.n_max and task.x_min <= x <= 9 for x, n in p.groups)
        assert gs.parse_problem(p.text) == p
        assert int(p.answer) == _brute_answer(p.text)
        par = gs.parallel_solution(p)
        traj = fmt.parse(par)  # the exact format holds
        assert traj.answer == p.answer
        assert len(traj.blocks) == 1 and len(traj.blocks[0].steps) == p.k
        seq = gs.sequential_solution(p)
        assert fmt.format_score(seq) == fmt.PENALTIES["missing_block"]
        assert fmt.extract_answer(seq) == p.answer
        for flaw in gs.FLAWS:
            bad = gs.flawed_solution(p, flaw, rng)
            assert fmt.format_score(bad) < 0, (flaw, bad)


def test_step_and_takeaway_are_the_local_operations():
    p = gs.Problem(((7, 5), (3, 8), (9, 4)))
    assert p.text == "a=7*5 b=3*8 c=9*4" and p.results == [5, 4, 6] and p.answer == "15"
    assert gs.step_text(p, 0) == "a=7*5 5:7 4:14 3:21 2:28 1:35 a:5"
    assert gs.takeaway_text(p) == "a:5=5 b:4=9 c:6=15"
    assert gs.parallel_solution(p).endswith("<takeaway>a:5=5 b:4=9 c:6=15</takeaway>\\boxed{15}")


def test_bad_specs_and_problems_are_named():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("sums")
    with pytest.raises(ValueError, match="bad knob"):
        get_task("multiples:q=3")
    with pytest.raises(ValueError, match="k=x"):
        get_task("multiples:k=x")
    with pytest.raises(ValueError, match="k_min"):
        get_task("multiples:k=5-2")
    with pytest.raises(ValueError, match="bad group"):
        gs.parse_problem("a=1*2 c=3*4")
    with pytest.raises(ValueError, match="bad group"):
        gs.parse_problem("a=12")
    with pytest.raises(ValueError, match="flaw"):
        gs.flawed_solution(gs.Problem(((1, 1),)), "nope", random.Random(0))


def test_training_draws_are_reproducible_and_never_held_out():
    task = get_task("multiples:k=2,n=2-3")  # a small space (256 problems): collisions would show
    src = TaskPrompts(task, seed=3)
    a = [src(d) for d in range(300)]
    b = [TaskPrompts(task, seed=3)(d) for d in range(300)]
    assert [(x.text, x.answer) for x in a] == [(x.text, x.answer) for x in b]
    assert all(not gs.is_heldout(x.meta["problem"]) for x in a)
    assert {x.text for x in a} != {x.text for x in (TaskPrompts(task, seed=4)(d) for d in range(300))}
    held = eval_set(task, 20, seed=0)
    assert len({p.text for p in held}) == 20 and all(gs.is_heldout(p.text) for p in held)
    assert not {p.text for p in held} & {x.meta["problem"] for x in a}
    assert [p.text for p in eval_set(task, 20, seed=0)] == [p.text for p in held]
    with pytest.raises(ValueError, match="fewer than"):
        eval_set(get_task("multiples:k=1,n=1"), 5)


def test_jsonl_round_trip(tmp_path):
    task = get_task("multiples:k=3,n=4")
    probs = eval_set(task, 7, seed=1)
    path = str(tmp_path / "eval.jsonl")
    write_jsonl(path, probs, task)
    rows = read_jsonl(path)
    assert [(r["problem"], r["answer"]) for r in rows] == [(p.text, p.answer) for p in probs]
    assert {r["task"] for r in rows} == {task_spec(task)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_jsonl(str(bad))


def test_tokenizer_round_trips_and_takes_the_tags(tmp_path):
    from transformers import AutoTokenizer

    from npr.tokenizer import add_tag_tokens, step_label_ids

    tok = build_tokenizer()
    p = gs.Problem(((7, 5), (3, 8)))
    text = gs.prompt_text(p.text) + gs.parallel_solution(p)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok.encode("<guideline></step>", add_special_tokens=False))
    assert pieces == ["<", "guideline", ">", "</", "step", ">"]
    assert all(len(tok.encode(d, add_special_tokens=False)) == 1 for d in "0123456789")
    tags = add_tag_tokens(tok)
    ids2 = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids2) == text and len(ids2) < len(ids)
    assert sum(i in tags.values() for i in ids2) == 4 * p.k + 4
    assert step_label_ids(tok, 2) == tok.encode("2:", add_special_tokens=False)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids2
    assert again.eos_token == "</s>" and again.pad_token == "<pad>"
