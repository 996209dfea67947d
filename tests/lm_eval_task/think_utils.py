"""process_results of ouro_tiny_think: pass@1 and pass@4 over the task's 4 samples per question."""

from ouro_jax.evaluation.pass_at_k import pass_at_k_results


def process_results(doc, results):
    """`results` holds one entry: the list of the question's 4 responses (the take_first_k filter)."""
    return pass_at_k_results(results[0], lambda r: r.strip() == doc["answer"].strip(), ks=(1, 4))
