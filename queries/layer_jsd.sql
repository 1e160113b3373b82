-- Histogram Jensen-Shannon divergence per layer between the per-token entropies of two groups (a model, narrowed to a run and/or prompt ids), on fixed bins of width bin_width anchored at 0, as distances.jsd_layer; layers matched as in the layer_map view. jsd in nats (0 .. ln 2); js_distance = sqrt(jsd) = scipy's jensenshannon.
-- @param model_a VARCHAR : model of group A
-- @param run_a VARCHAR = NULL : only this run in group A
-- @param prompts_a INTEGER[] = NULL : only these prompt ids in group A
-- @param model_b VARCHAR = NULL : model of group B (default: model_a)
-- @param run_b VARCHAR = NULL : only this run in group B
-- @param prompts_b INTEGER[] = NULL : only these prompt ids in group B
-- @param alpha DOUBLE = 1.0 : Rényi order
-- @param bin_width DOUBLE = 0.25 : histogram bin width in nats (bins [k w, (k+1) w))
SELECT layer_a, layer_b, n_a, n_b, jsd, sqrt(greatest(jsd, 0)) AS js_distance
FROM jsd_layers(false, $model_a::VARCHAR, $run_a::VARCHAR, $prompts_a::INTEGER[],
                coalesce($model_b::VARCHAR, $model_a::VARCHAR), $run_b::VARCHAR,
                $prompts_b::INTEGER[], $alpha::DOUBLE, NULL::VARCHAR[], 0, $bin_width::DOUBLE)
ORDER BY layer_a;
