"""The learned controller's parts: the option grid a head may get (`options`), the network
(`net`), its files (`files`, with the shipped controllers in `shipped/`), the knapsack that picks
one option per head (`allocator`) and the MLflow registry fetch (`registry`). The policy that
uses them is `adaptive_kv.policies.learned`.
"""
