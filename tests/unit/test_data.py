import json
import re
import sys
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lori_ray.data import (
    ARITHMETIC_SYMBOLS,
    DataFormatError,
    Example,
    generate_multiplication,
    load_hf_gsm8k,
    multiplication_example,
    normalize_answer,
    parse_hf_spec,
    parse_line,
    read_examples,
    read_gsm8k_jsonl,
    read_icot,
    split_steps,
    write_icot,
)

# Lines from the published iCoT validation files (github.com/da03/Internalize_CoT_Step_by_Step, MIT).
ICOT_4X4 = ("5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 ) + "
            "0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1")
ICOT_5X5 = ("3 5 4 1 1 * 2 1 4 6 5||6 0 9 2 2 0 + 0 3 5 4 1 1 0 ( 6 3 4 7 3 1 0 ) + 0 0 2 1 8 5 4 0 "
            "( 6 3 6 8 1 7 4 0 ) + 0 0 0 8 1 7 8 6 0 ( 6 3 6 6 3 4 3 7 0 ) + 0 0 0 0 5 6 2 7 5 0 "
            "#### 6 3 6 6 8 0 6 4 6 0")
GSM8K = "Johann had 60 oranges. He ate 10. Half were stolen. How many now?||<<60-10=50>> <<50/2=25>> #### 25"
GSM8K_NO_COT = "How many books did she collect in the first week if she has 99 books now?|| #### 9"


@pytest.mark.parametrize("line", [ICOT_4X4, ICOT_5X5, GSM8K, GSM8K_NO_COT])
def test_line_round_trip(line):
    assert parse_line(line).to_line() == line


@pytest.mark.parametrize("line", [ICOT_4X4, ICOT_5X5])
def test_generator_reproduces_published_lines(line):
    a, b = parse_line(line).question.split(" * ")

    def value(digits):
        return int("".join(reversed(digits.split())))

    assert multiplication_example(value(a), value(b), len(a.split()), len(b.split())).to_line() == line


def test_generated_problems_are_distinct_correct_and_exclude():
    held_out = generate_multiplication(50, 3, 2, seed=1)
    examples = generate_multiplication(300, 3, 2, seed=0, exclude={e.question for e in held_out})
    assert len({e.question for e in examples}) == 300
    assert not {e.question for e in examples} & {e.question for e in held_out}
    for e in examples:
        a, b = (int("".join(reversed(x.split()))) for x in e.question.split(" * "))
        assert 100 <= a < 1000 and 10 <= b < 100
        assert int("".join(reversed(e.answer.split()))) == a * b
        assert len(e.steps) == 2


def test_step_segmentation():
    assert split_steps("1 2 + 0 3 4 ( 1 5 4 ) + 0 0 6") == ("1 2", "0 3 4 ( 1 5 4 )", "0 0 6")
    assert split_steps("<<4-2=2>> <<2/.5=4>>") == ("<<4-2=2>>", "<<2/.5=4>>")
    assert split_steps(" ") == ()
    assert len(parse_line(ICOT_4X4).steps) == 4


@pytest.mark.parametrize("line, message", [
    ("1 2 * 3 4 #### 4 0 4", "exactly one '||'"),
    ("1 2 * 3 4||1 2 + 3", "exactly one '####'"),
    ("||1 2 #### 3", "empty question"),
    ("1 * 2||2 #### ", "empty answer"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(ICOT_4X4 + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=rf"bad.txt:2: .*{message}"):
        read_icot(path)


def test_symbols_outside_a_word_level_vocabulary_are_a_bad_line_only_where_one_is_given(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(ICOT_4X4 + "\n1 2 * a b||1 + 2 #### 3\n" + ICOT_4X4 + "\n")
    symbols = frozenset(ARITHMETIC_SYMBOLS)
    with pytest.raises(DataFormatError, match=r"x.txt:2: 'a' is not in the vocabulary of a model built from a preset"):
        read_examples(path, symbols=symbols)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed lines \(lines 2\)"):
        assert len(read_examples(path, skip_bad=True, symbols=symbols)) == 2
    assert len(read_examples(path)) == 3  # a pretrained tokenizer reads any text


def test_icot_file_round_trip(tmp_path):
    examples = generate_multiplication(20, 4, 4, seed=3)
    write_icot(examples, tmp_path / "x.txt")
    assert read_examples(tmp_path / "x.txt") == examples


def test_gsm8k_jsonl_conversion(tmp_path):
    records = [
        {"question": "Natalia sold clips to 48 friends in April, half as many in May. Total?",
         "answer": "In May 48/2 = <<48/2=24>>24.\nTotal 48+24 = <<48+24=72>>72.\n#### 72"},
        {"question": "A big sum?", "answer": "It is large.\n#### 1,500"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    first, second = read_gsm8k_jsonl(path)
    assert first == Example(records[0]["question"], ("<<48/2=24>>", "<<48+24=72>>"), "72")
    assert first.to_line().endswith("||<<48/2=24>> <<48+24=72>> #### 72")
    assert second.steps == () and second.answer == "1500"
    path.write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match="train.jsonl:2:"):
        read_gsm8k_jsonl(path)


def test_normalize_answer():
    assert normalize_answer(" 1,500 ") == "1500" == normalize_answer("1 5 0 0")


@pytest.mark.parametrize("text, expected", [
    ("$1,234.00 dollars.", "1234"),
    ("1,234", "1234"),
    ("  72\n", "72"),
    ("72 eggs", "72"),
    ("The answer is 18.", "18"),
    ("$18", "18"),
    ("50%", "50"),
    ("7.0", "7"),
    ("2.50", "2.5"),
    (".5 cups", "0.5"),
    ("-7", "-7"),
    ("-1,200.50 m", "-1200.5"),
    ("109,200,000", "109200000"),
    # the multiplication layout: digits least-significant first, spaces between, zeros kept
    ("5 5 6 0 8 2 0 1", "55608201"),
    ("0 0 6 4 9 0", "006490"),
    ("", ""),
    ("no number here", "nonumberhere"),
])
def test_normalize_answer_cases(text, expected):
    assert normalize_answer(text) == expected


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_normalize_answer_formats_of_one_integer_agree(n):
    plain = str(n)
    sign, digits = ("-", plain[1:]) if n < 0 else ("", plain)
    for text in (plain, f"{n:,}", f"{sign}${abs(n):,}.00 dollars.", f"{n}.0", f" {n:,} units and more text 99",
                 sign + " ".join(digits)):
        assert normalize_answer(text) == plain, text


@given(st.lists(st.integers(0, 9), min_size=1, max_size=20))
def test_normalize_answer_keeps_multiplication_digits(digits):
    spaced = " ".join(map(str, digits))
    assert normalize_answer(spaced) == "".join(map(str, digits)) == normalize_answer(f" {spaced} ")


@given(st.text(max_size=40))
def test_normalize_answer_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@pytest.mark.parametrize("spec, expected", [
    ("hf:openai/gsm8k", ("openai/gsm8k", "main", "train")),
    ("hf:openai/gsm8k@test", ("openai/gsm8k", "main", "test")),
    ("hf:openai/gsm8k/socratic@train[:100]", ("openai/gsm8k", "socratic", "train[:100]")),
])
def test_hf_spec(spec, expected):
    assert parse_hf_spec(spec) == expected


@pytest.mark.parametrize("spec", ["hf:", "hf:gsm8k with space", "hf:a/b/c/d"])
def test_bad_hf_spec_is_named(spec):
    with pytest.raises(ValueError, match="hf:OWNER/NAME"):
        parse_hf_spec(spec)


def test_hf_gsm8k_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "Two plus two?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
                {"question": "Big?", "answer": "#### 1,000"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    first, second = read_examples("hf:openai/gsm8k@test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert first == Example("Two plus two?", ("<<2+2=4>>",), "4") and second.answer == "1000"


def test_hf_gsm8k_errors_are_clear(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(DataFormatError, match=r"hf:openai/gsm8k: could not load .* local train.jsonl works offline"):
        load_hf_gsm8k("hf:openai/gsm8k")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="needs the 'datasets' package"):
        load_hf_gsm8k("hf:openai/gsm8k")


def test_every_gsm8k_answer_normalises_to_a_plain_integer(tmp_path):
    # the final-answer forms GSM8K's train.jsonl holds: plain, thousands commas, negative, currency
    import json
    answers = ["18", "1,000", "-3", "$70", "10,000"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a <<1+1=2>> 2\n#### {a}"}) + "\n"
                            for i, a in enumerate(answers)))
    examples = read_gsm8k_jsonl(path)
    assert [e.answer for e in examples] == ["18", "1000", "-3", "70", "10000"]
    assert normalize_answer(examples[1].answer + " dollars.") == examples[1].answer


def test_chat_files_and_list_valued_steps_read_as_questions_cots_and_answers(tmp_path):
    from lori_ray.data import read_table
    chats = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3 + 4 * 2"},
                           {"role": "assistant", "content": "4 * 2 = 8\n3 + 8 = 11\n#### 11"}]},
             {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "#### 1"},
                           {"role": "user", "content": "2 * 5"}, {"role": "assistant", "content": "2*5=10 #### 10"}]}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    fields = {"question": "question", "cot": "cot", "answer": "answer", "messages": "messages", "answer_marker": "####"}
    first, second = read_table(path, fields)
    assert (first.question, first.steps, first.answer) == ("3 + 4 * 2", ("4 * 2 = 8", "3 + 8 = 11"), "11")
    assert (second.question, second.steps, second.answer) == ("2 * 5", ("2*5=10",), "10")  # the last exchange
    assert read_table(path, {**fields, "answer_marker": "="}, step_separator=r"\n")[1].answer == "10 #### 10"

    coconut = tmp_path / "coconut.json"
    coconut.write_text(json.dumps([{"question": "3 + 4 * 2", "steps": ["4 * 2 = 8", "3 + 8 = 11"], "answer": "11"}]))
    (example,) = read_table(coconut, {"question": "question", "cot": "steps", "answer": "answer"})
    assert example.steps == ("4 * 2 = 8", "3 + 8 = 11")  # the list's items, not its printed form


def test_a_chat_in_content_parts_gives_one_step_per_part(tmp_path):
    """OpenAI-style content parts (every turn a list of text parts): the assistant's parts are the list-valued
    steps, the last part holding the marker ends them and holds the answer."""
    from lori_ray.data import read_table

    def text(*parts):
        return [{"type": "text", "text": part} for part in parts]
    chats = [{"messages": [{"role": "system", "content": text("be brief")},
                           {"role": "user", "content": text("3 + 4 * 2")},
                           {"role": "assistant", "content": text("4 * 2 = 8", "3 + 8 = 11", "#### 11")}]},
             {"messages": [{"role": "user", "content": text("2 *", "5")},
                           {"role": "assistant", "content": text("2*5=10", "so #### 10")}]}]
    path = tmp_path / "parts.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    first, second = read_table(path, {"messages": "messages", "answer_marker": "####"})
    assert (first.question, first.steps, first.answer) == ("3 + 4 * 2", ("4 * 2 = 8", "3 + 8 = 11"), "11")
    assert (second.question, second.steps, second.answer) == ("2 * 5", ("2*5=10", "so"), "10")
    assert first.cot == "4 * 2 = 8\n3 + 8 = 11"  # the teacher's CoT: one part a line
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
             {"role": "assistant", "content": text("#### 1")}]
    path.write_text(json.dumps({"messages": image}) + "\n")
    with pytest.raises(DataFormatError,
                       match=re.escape(f"{path}: row 1: messages: a content part of type 'image_url'")):
        read_table(path, {"messages": "messages", "answer_marker": "####"})


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "q"}], "row 1: messages: no assistant turn"),
    ([{"role": "assistant", "content": "x #### 1"}], "row 1: messages: no user turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "x = 1"}],
     "row 1: messages: the assistant turn has no '####' before its answer (data.fields.answer_marker)"),
    ("not a chat", "row 1: messages: not a list of {role, content} turns"),
])
def test_a_malformed_chat_names_the_file_and_row_or_is_skipped(tmp_path, messages, message):
    from lori_ray.data import read_table
    path = tmp_path / "chat.jsonl"
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "s #### 1"}]
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"messages": good}) + "\n")
    fields = {"messages": "messages", "answer_marker": "####"}
    with pytest.raises(DataFormatError, match=re.escape(f"{path}: {message}")):
        read_table(path, fields)
    with pytest.warns(UserWarning, match="skipped 1 malformed rows"):
        assert len(read_table(path, fields, skip_bad=True)) == 1


def rows_of(examples) -> dict[str, list]:
    return {"problem": [e.question for e in examples], "steps": [list(e.steps) for e in examples],
            "solution": [e.answer for e in examples]}


TABLE_FIELDS = {"question": "problem", "cot": "steps", "answer": "solution"}


def test_a_folder_saved_by_datasets_reads_by_its_columns_and_a_datasetdict_by_its_split(tmp_path):
    from datasets import Dataset, DatasetDict

    from lori_ray.data import source_problem
    train, test = generate_multiplication(6, 2, 2, seed=1), generate_multiplication(3, 2, 2, seed=2)
    Dataset.from_dict(rows_of(train)).save_to_disk(tmp_path / "one")
    both = DatasetDict({"train": Dataset.from_dict(rows_of(train)), "test": Dataset.from_dict(rows_of(test))})
    both.save_to_disk(tmp_path / "both")
    DatasetDict({"train": Dataset.from_dict(rows_of(train))}).save_to_disk(tmp_path / "only")
    same = [(e.question, e.steps, e.answer) for e in train]
    for spec in (tmp_path / "one", f"{tmp_path / 'both'}@train", tmp_path / "only"):
        assert [(e.question, e.steps, e.answer) for e in read_examples(spec, fields=TABLE_FIELDS)] == same
    assert [e.question for e in read_examples(f"{tmp_path / 'both'}@test", fields=TABLE_FIELDS)] == \
        [e.question for e in test]
    assert source_problem(f"{tmp_path / 'both'}") == f"{tmp_path / 'both'}: a DatasetDict with the splits train, " \
                                                     f"test; name one as {tmp_path / 'both'}@SPLIT"
    assert source_problem(f"{tmp_path / 'both'}@valid") == f"{tmp_path / 'both'}: no split 'valid'; its splits: " \
                                                           "train, test"
    assert "is a Dataset saved without splits" in source_problem(f"{tmp_path / 'one'}@train")
    with pytest.raises(DataFormatError, match=r"a DatasetDict with the splits train, test"):
        read_examples(tmp_path / "both", fields=TABLE_FIELDS)
    with pytest.raises(DataFormatError, match=r"one: a table \(parquet, or a dataset saved by datasets\) is read by "
                                              r"its columns: name them with data.fields"):
        read_examples(tmp_path / "one")
    Dataset.from_dict({"problem": ["1 * 2", "3 * 4"], "solution": ["2", ""]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(DataFormatError, match=r"bad: no column 'steps' \(data.fields.cot\); its columns: problem, "):
        read_examples(tmp_path / "bad", fields=TABLE_FIELDS)
    with pytest.raises(DataFormatError, match=r"bad: row 2: empty answer \(column 'solution'\)"):
        read_examples(tmp_path / "bad", fields={**TABLE_FIELDS, "cot": None})


def test_parquet_shards_in_a_folder_or_a_glob_read_in_name_order_and_errors_name_the_shard_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lori_ray.data import source_problem
    examples = generate_multiplication(9, 2, 2, seed=4)
    (tmp_path / "shards").mkdir()
    for number, (start, end) in reversed(list(enumerate([(0, 4), (4, 7), (7, 9)]))):  # the names give the order
        pq.write_table(pa.table(rows_of(examples[start:end])),
                       tmp_path / "shards" / f"train-{number:05d}-of-00003.parquet")
    (tmp_path / "shards" / "README.md").write_text("not a shard")
    expected = [(e.question, e.steps, e.answer) for e in examples]
    for spec in (tmp_path / "shards", f"{tmp_path}/shards/train-*.parquet", f"{tmp_path}/**/*.parquet"):
        assert [(e.question, e.steps, e.answer) for e in read_examples(spec, fields=TABLE_FIELDS)] == expected
    assert source_problem(f"{tmp_path}/shards/*") == f"{tmp_path}/shards/*: matches {tmp_path}/shards/README.md, " \
                                                     "not a .parquet file"
    assert source_problem(f"{tmp_path}/shards/test-*.parquet") == f"{tmp_path}/shards/test-*.parquet: no file matches"
    (tmp_path / "empty").mkdir()
    assert source_problem(str(tmp_path / "empty")) == (f"{tmp_path / 'empty'}: a folder with neither a dataset saved "
                                                       "by datasets (save_to_disk) nor .parquet files")
    assert source_problem(str(tmp_path / "none.parquet")) == f"no such file: {tmp_path / 'none.parquet'}"
    broken = rows_of(examples[:3])
    broken["solution"][1] = None
    pq.write_table(pa.table(broken), tmp_path / "shards" / "train-00001-of-00003.parquet")
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path}/shards/train-00001-of-00003.parquet: row 2: "
                                                        "empty answer (column 'solution')")):
        read_examples(tmp_path / "shards", fields=TABLE_FIELDS)
    with pytest.warns(UserWarning, match=r"skipped 1 malformed rows \(rows .*train-00001-of-00003.parquet: 2\)"):
        assert len(read_examples(tmp_path / "shards", skip_bad=True, fields=TABLE_FIELDS)) == 8
    pq.write_table(pa.table({"problem": ["1 * 2"]}), tmp_path / "shards" / "train-00001-of-00003.parquet")
    with pytest.raises(DataFormatError, match=r"train-00001-of-00003.parquet: no column 'steps' \(data.fields.cot\)"):
        read_examples(tmp_path / "shards", fields=TABLE_FIELDS)


def test_a_data_file_setting_that_names_no_data_is_a_config_error_naming_the_field(tmp_path):
    from lori_ray.config import ConfigError, validate
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data.train_file: .*empty: a folder with neither a dataset saved by "
                                          r"datasets \(save_to_disk\) nor .parquet files"):
        validate({"data": {"task": "file", "train_file": str(tmp_path / "empty"), "fields": {}}})
    with pytest.raises(ConfigError, match=r"data.eval_file: .*/x-\*.parquet: no file matches"):
        validate({"data": {"eval_file": f"{tmp_path}/x-*.parquet", "fields": {}}})


def test_the_teachers_cot_joins_the_steps_with_the_datas_own_joiner_or_the_configured_one(tmp_path):
    from lori_ray.data import read_table
    rows = [{"q": "3 + 4 * 2", "steps": ["4 * 2 = 8", "3 + 8 = 11"], "text": "4 * 2 = 8 ;  3 + 8 = 11", "a": "11",
             "chat": [{"role": "user", "content": "3 + 4 * 2"},
                      {"role": "assistant", "content": "4 * 2 = 8\n3 + 8 = 11\n#### 11"}]},
            {"q": "1 + 1", "steps": [], "text": "", "a": "2",
             "chat": [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "#### 2"}]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {"question": "q", "cot": "steps", "answer": "a"}

    def read(**options):
        return read_table(path, {**fields, **options.pop("fields", {})}, **options)

    listed, empty = read()
    assert listed.cot == "4 * 2 = 8\n3 + 8 = 11" and empty.joiner == "\n"  # one joiner for the whole file
    assert read(fields={"messages": "chat"})[0].cot == "4 * 2 = 8\n3 + 8 = 11"
    # a CoT split at a regex keeps the text the regex first matched, for every row
    assert [e.joiner for e in read(fields={"cot": "text"}, step_separator=r"\s*;\s*")] == [" ;  ", " ;  "]
    assert read(step_joiner=" then ")[0].cot == "4 * 2 = 8 then 3 + 8 = 11"
    equations = tmp_path / "gsm.csv"
    equations.write_text("q,cot,a\nsum?,<<1+1=2>> <<2*3=6>>,6\n")
    (gsm,) = read_table(equations, {"question": "q", "cot": "cot", "answer": "a"})
    assert gsm.joiner is None and gsm.cot == "<<1+1=2>> <<2*3=6>>"  # the format's own


def test_a_cot_written_with_a_joiner_splits_back_at_it():
    from lori_ray.data import split_steps
    assert split_steps(" 3+4=7\n7*2=14 ", "\n") == ("3+4=7", "7*2=14")
    assert split_steps("a ; b;c", " ; ") == ("a", "b", "c")  # the joiner's visible text, spaces or none
    assert split_steps("1 2 + 3 4", None) == ("1 2", "3 4")
    example = parse_line("q|| 3+4=7\n7*2=14 #### 14", joiner="\n")
    assert example.steps == ("3+4=7", "7*2=14") and example.joiner == "\n"
