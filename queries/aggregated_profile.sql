-- Per model, run, alpha and layer across prompts (each prompt weighs the same, as AggregatedProfile): number of prompts, mean and sample std of the per-prompt mean entropies.
-- @param model VARCHAR = NULL : only this model
-- @param run_id VARCHAR = NULL : only this run
-- @param alpha DOUBLE = NULL : only this Rényi order
SELECT model, run_id, alpha, layer, count(*) AS n_prompts, avg(mean_entropy) AS mean,
       coalesce(stddev_samp(mean_entropy), 0) AS std
FROM prompt_profile
WHERE ($model::VARCHAR IS NULL OR model = $model)
  AND ($run_id::VARCHAR IS NULL OR run_id = $run_id)
  AND ($alpha::DOUBLE IS NULL OR alpha = $alpha)
GROUP BY ALL
ORDER BY model, run_id, alpha, layer;
