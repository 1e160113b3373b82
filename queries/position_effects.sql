-- Entropy by token position (row index within a profile) per model, run, alpha and layer: count, mean and sample std over prompts.
-- @param model VARCHAR = NULL : only this model
-- @param run_id VARCHAR = NULL : only this run
-- @param alpha DOUBLE = 1.0 : Rényi order
-- @param layer INTEGER = NULL : only this layer
-- @param max_pos INTEGER = NULL : only positions < max_pos
SELECT model, run_id, alpha, layer, pos, count(*) AS n, avg(entropy) AS mean,
       stddev_samp(entropy) AS std
FROM entropy
WHERE alpha = $alpha::DOUBLE
  AND ($model::VARCHAR IS NULL OR model = $model)
  AND ($run_id::VARCHAR IS NULL OR run_id = $run_id)
  AND ($layer::INTEGER IS NULL OR layer = $layer)
  AND ($max_pos::INTEGER IS NULL OR pos < $max_pos)
GROUP BY ALL
ORDER BY model, run_id, alpha, layer, pos;
