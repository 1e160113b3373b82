-- The k prompts whose mean profiles (mean entropy per layer over the prompt's tokens) are nearest to a given prompt's, by Euclidean distance over the layers both have; within each run of the model.
-- @param model VARCHAR : the model
-- @param prompt_id INTEGER : the prompt to match
-- @param k INTEGER = 10 : how many neighbours
-- @param run_id VARCHAR = NULL : only this run
-- @param alpha DOUBLE = 1.0 : Rényi order
WITH pp AS (
    SELECT run_id, prompt_id, layer, mean_entropy FROM prompt_profile
    WHERE model = $model::VARCHAR AND alpha = $alpha::DOUBLE
      AND ($run_id::VARCHAR IS NULL OR run_id = $run_id)),
target AS (SELECT run_id, layer, mean_entropy FROM pp WHERE prompt_id = $prompt_id::INTEGER),
dist AS (
    SELECT pp.run_id, pp.prompt_id, sqrt(sum((pp.mean_entropy - t.mean_entropy) ^ 2)) AS distance
    FROM pp JOIN target t USING (run_id, layer)
    WHERE pp.prompt_id <> $prompt_id::INTEGER
    GROUP BY ALL),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY run_id ORDER BY distance, prompt_id) AS rank
    FROM dist)
SELECT r.run_id, r.rank, r.prompt_id, r.distance, p.text
FROM ranked r
LEFT JOIN prompts p ON p.model = $model::VARCHAR AND p.run_id = r.run_id
                   AND p.prompt_id = r.prompt_id
WHERE r.rank <= $k::INTEGER
ORDER BY r.run_id, r.rank;
