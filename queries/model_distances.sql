-- Model x model distance matrix (long form, both orders and the zero diagonal): the mean over matched layers (layer_map) of the per-layer distance between the models' pooled per-token entropies; metric 'jsd' (histogram JSD in nats, as distances.jsd_layer) or 'wasserstein' (exact W1, as distances.wasserstein_layer); for models with equal layers this is distances.profile_distance(..., aggregation='mean') of the pooled profiles.
-- @param alpha DOUBLE = 1.0 : Rényi order
-- @param metric VARCHAR = 'jsd' : 'jsd' or 'wasserstein'
-- @param bin_width DOUBLE = 0.25 : histogram bin width in nats (jsd)
-- @param runs VARCHAR[] = NULL : only these run ids (NULL: all runs, pooled per model)
WITH checked AS (
    SELECT CASE WHEN $metric::VARCHAR IN ('jsd', 'wasserstein') THEN $metric::VARCHAR
                ELSE error('metric must be ''jsd'' or ''wasserstein''') END AS metric),
per_layer AS (
    SELECT model_a AS a, model_b AS b, jsd AS d
    FROM jsd_layers(true, NULL, NULL, NULL, NULL, NULL, NULL, $alpha::DOUBLE,
                    $runs::VARCHAR[], $bin_width::DOUBLE)
    WHERE $metric::VARCHAR = 'jsd'
    UNION ALL
    SELECT model_a, model_b, wasserstein
    FROM w1_layers(true, NULL, NULL, NULL, NULL, NULL, NULL, $alpha::DOUBLE, $runs::VARCHAR[])
    WHERE $metric::VARCHAR = 'wasserstein'),
pairs AS (SELECT a, b, count(*) AS n_layers, avg(d) AS distance FROM per_layer GROUP BY ALL),
models AS (SELECT DISTINCT r.model, m.n_layers FROM runs r JOIN model_layers m USING (model)
           WHERE $runs::VARCHAR[] IS NULL OR list_contains($runs::VARCHAR[], r.run_id))
SELECT (SELECT metric FROM checked) AS metric, model_a, model_b, n_layers, distance FROM (
    SELECT a AS model_a, b AS model_b, n_layers, distance FROM pairs
    UNION ALL SELECT b, a, n_layers, distance FROM pairs
    UNION ALL SELECT model, model, n_layers, 0.0 FROM models)
ORDER BY model_a, model_b;
