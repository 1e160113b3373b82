-- Per token: the layer of minimum entropy (ties: the shallowest) and its entropy, and the layer-to-layer velocity v = (H[l] - H[l_prev]) / (l - l_prev) between consecutive profiled layers: its mean absolute value, and the steepest drop (most negative v) with the layer it arrives at.
-- @param model VARCHAR = NULL : only this model
-- @param run_id VARCHAR = NULL : only this run
-- @param alpha DOUBLE = 1.0 : Rényi order
-- @param prompt_id INTEGER = NULL : only this prompt
WITH sel AS (
    SELECT model, run_id, prompt_id, pos, token_id, layer, entropy::DOUBLE AS h FROM entropy
    WHERE alpha = $alpha::DOUBLE
      AND ($model::VARCHAR IS NULL OR model = $model)
      AND ($run_id::VARCHAR IS NULL OR run_id = $run_id)
      AND ($prompt_id::INTEGER IS NULL OR prompt_id = $prompt_id)),
steps AS (
    SELECT *, (h - lag(h) OVER tok) / (layer - lag(layer) OVER tok) AS v
    FROM sel WINDOW tok AS (PARTITION BY model, run_id, prompt_id, pos ORDER BY layer))
SELECT model, run_id, prompt_id, pos, any_value(token_id) AS token_id,
       arg_min(layer, {'h': h, 'layer': layer}) AS min_layer, min(h) AS min_entropy,
       avg(abs(v)) AS mean_abs_velocity,
       arg_min(layer, {'v': v, 'layer': layer}) FILTER (WHERE v IS NOT NULL) AS max_drop_layer,
       min(v) AS max_drop_velocity
FROM steps
GROUP BY model, run_id, prompt_id, pos
ORDER BY model, run_id, prompt_id, pos;
