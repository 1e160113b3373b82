-- Exact Wasserstein-1 distance per layer between the per-token entropies of two groups (a model, narrowed to a run and/or prompt ids); layers matched as in the layer_map view; equal to scipy.stats.wasserstein_distance.
-- @param model_a VARCHAR : model of group A
-- @param run_a VARCHAR = NULL : only this run in group A
-- @param prompts_a INTEGER[] = NULL : only these prompt ids in group A
-- @param model_b VARCHAR = NULL : model of group B (default: model_a)
-- @param run_b VARCHAR = NULL : only this run in group B
-- @param prompts_b INTEGER[] = NULL : only these prompt ids in group B
-- @param alpha DOUBLE = 1.0 : Rényi order
SELECT layer_a, layer_b, n_a, n_b, wasserstein
FROM w1_layers(false, $model_a::VARCHAR, $run_a::VARCHAR, $prompts_a::INTEGER[],
               coalesce($model_b::VARCHAR, $model_a::VARCHAR), $run_b::VARCHAR,
               $prompts_b::INTEGER[], $alpha::DOUBLE, NULL::VARCHAR[], 0)
ORDER BY layer_a;
