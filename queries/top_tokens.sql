-- The top tokens of one prompt at every layer and position, with their text (runs profiled with --top-tokens K): one row per position, layer and rank.
-- @param prompt_id INTEGER : the prompt (its id in the corpus, 0-based)
-- @param model VARCHAR = NULL : only this model
-- @param run_id VARCHAR = NULL : only this run
-- @param max_rank INTEGER = NULL : only ranks < max_rank (0 = the most probable token)
SELECT t.model, t.run_id, t.prompt_id, t.pos, e.token_id AS next_token_id,
       nv.text AS next_token, t.layer, t.rank, t.token_id, v.text, t.prob
FROM top_tokens t
JOIN (SELECT DISTINCT model, run_id, prompt_id, pos, token_id FROM entropy
      WHERE prompt_id = $prompt_id) e USING (model, run_id, prompt_id, pos)
LEFT JOIN vocab v ON v.run_id = t.run_id AND v.token_id = t.token_id
LEFT JOIN vocab nv ON nv.run_id = t.run_id AND nv.token_id = e.token_id
WHERE t.prompt_id = $prompt_id::INTEGER
  AND ($model::VARCHAR IS NULL OR t.model = $model)
  AND ($run_id::VARCHAR IS NULL OR t.run_id = $run_id)
  AND ($max_rank::INTEGER IS NULL OR t.rank < $max_rank)
ORDER BY t.model, t.run_id, t.pos, t.layer, t.rank;
