from lori_ray.data import generate_multiplication
from lori_ray.evaluate import evaluate
from lori_ray.models import build_model
from lori_ray.tokens import Layout, arithmetic_tokenizer


def test_evaluate_reports_progress_per_batch_and_counts_generated_tokens():
    tokenizer = arithmetic_tokenizer()
    layout = Layout(tokenizer)
    model = build_model("llama", "tiny", len(tokenizer), 64, {"pad_token_id": layout.pad, "eos_token_id": layout.eos})
    calls = []
    result = evaluate(model, layout, generate_multiplication(5, 2, 2, seed=0), with_cot=True, batch_size=2,
                      max_new_tokens=6, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert result.examples == 5 and 0 <= result.tokens_per_answer <= 6 and result.seconds > 0


def test_digit_accuracy_counts_each_position_over_the_answers_that_long():
    from lori_ray.evaluate import digit_accuracy
    assert digit_accuracy(["123", "120", "1", "99"], ["123", "123", "124", "9"]) == (1.0, 2 / 3, 1 / 3)
    assert digit_accuracy([], []) == ()
