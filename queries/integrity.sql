-- Per run: rows against the rows its prompts' token counts imply (tokens x layers x alphas), duplicate keys, prompts missing from the corpus range, prompts with too few rows, and NaN, inf and negative entropies. ok is true when every count is as expected.
-- @param run_id VARCHAR = NULL : only this run
WITH r AS (
    SELECT model, run_id, any_value(n_prompts) AS corpus_prompts,
           coalesce(any_value(len(layer_indices)), 0) AS n_layers, any_value(len(alphas)) AS n_alphas,
           bool_and(status = 'complete') AND count(DISTINCT shard) = any_value(n_shards)
               AS complete
    FROM runs WHERE $run_id::VARCHAR IS NULL OR run_id = $run_id GROUP BY ALL),
p AS (SELECT model, run_id, count(*) AS n_prompts, count(DISTINCT prompt_id) AS n_distinct,
             sum(n_tokens)::BIGINT AS n_tokens FROM prompts GROUP BY ALL),
rows_per_prompt AS (
    SELECT model, run_id, prompt_id, count(*) AS n_rows,
           count(*) FILTER (WHERE isnan(entropy)) AS n_nan,
           count(*) FILTER (WHERE isinf(entropy)) AS n_inf,
           count(*) FILTER (WHERE entropy < 0) AS n_negative
    FROM entropy WHERE $run_id::VARCHAR IS NULL OR run_id = $run_id GROUP BY ALL),
keys AS (
    SELECT model, run_id, count(*) AS n_duplicates FROM (
        SELECT model, run_id FROM entropy
        WHERE $run_id::VARCHAR IS NULL OR run_id = $run_id
        GROUP BY model, run_id, prompt_id, pos, layer, alpha HAVING count(*) > 1)
    GROUP BY ALL),
short AS (
    SELECT pr.model, pr.run_id, count(*) AS n_short FROM prompts pr
    JOIN r USING (model, run_id)
    LEFT JOIN rows_per_prompt x USING (model, run_id, prompt_id)
    WHERE coalesce(x.n_rows, 0) <> pr.n_tokens * r.n_layers * r.n_alphas GROUP BY ALL),
e AS (SELECT model, run_id, sum(n_rows)::BIGINT AS n_rows, sum(n_nan)::BIGINT AS n_nan,
             sum(n_inf)::BIGINT AS n_inf, sum(n_negative)::BIGINT AS n_negative
      FROM rows_per_prompt GROUP BY ALL)
SELECT *, (n_rows = expected_rows AND n_duplicates = 0 AND n_duplicate_prompts = 0
           AND (n_missing_prompts = 0 OR NOT complete) AND n_prompts_with_wrong_rows = 0
           AND n_nan = 0 AND n_inf = 0 AND n_negative = 0) AS ok
FROM (
    SELECT r.model, r.run_id, r.complete, r.corpus_prompts,
           coalesce(p.n_prompts, 0) AS n_prompts, coalesce(p.n_tokens, 0) AS n_tokens,
           coalesce(e.n_rows, 0) AS n_rows,
           coalesce(p.n_tokens, 0) * r.n_layers * r.n_alphas AS expected_rows,
           coalesce(k.n_duplicates, 0) AS n_duplicates,
           coalesce(p.n_prompts, 0) - coalesce(p.n_distinct, 0) AS n_duplicate_prompts,
           r.corpus_prompts - coalesce(p.n_distinct, 0) AS n_missing_prompts,
           coalesce(s.n_short, 0) AS n_prompts_with_wrong_rows,
           coalesce(e.n_nan, 0) AS n_nan, coalesce(e.n_inf, 0) AS n_inf,
           coalesce(e.n_negative, 0) AS n_negative
    FROM r
    LEFT JOIN p USING (model, run_id)
    LEFT JOIN e USING (model, run_id)
    LEFT JOIN keys k USING (model, run_id)
    LEFT JOIN short s USING (model, run_id))
ORDER BY model, run_id;
