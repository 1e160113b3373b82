-- Run x run distance matrix (long form, both orders and the zero diagonal), one entry per run: runs are never pooled, so two runs of one model (text and generation, two dtypes) are two entries. metric 'jsd' (histogram JSD in nats, as distances.jsd_layer) or 'wasserstein' (exact W1, as distances.wasserstein_layer): the mean over the layers paired at relative depth (run_layer_map) of the per-layer distance between the runs' per-token entropies; 'fisher_rao' (radians, as distances.fisher_rao_distance) between their mean profiles at those layers. This is distances.profile_distance(..., aggregation='mean') of each run's profiles pooled into one; srvf has no SQL form (its warp search runs in Python: `entropy-fast compare --metric srvf`).
-- @param alpha DOUBLE = 1.0 : Rényi order (runs without it are left out)
-- @param metric VARCHAR = 'jsd' : 'jsd', 'wasserstein' or 'fisher_rao'
-- @param bin_width DOUBLE = 0.25 : histogram bin width in nats (jsd)
-- @param runs VARCHAR[] = NULL : only these run ids (NULL: every run)
-- @param mode VARCHAR = NULL : only 'text' or 'generation' runs
-- @param skip_positions INTEGER = 0 : leave the first N rows of each prompt out
WITH checked AS (
    SELECT CASE WHEN $metric::VARCHAR IN ('jsd', 'wasserstein', 'fisher_rao')
                THEN $metric::VARCHAR
                ELSE error('metric must be ''jsd'', ''wasserstein'' or ''fisher_rao'' (srvf: '
                           || 'entropy-fast compare --metric srvf)') END AS metric,
           CASE WHEN $mode::VARCHAR IS NULL OR $mode::VARCHAR IN ('text', 'generation')
                THEN $mode::VARCHAR
                ELSE error('mode must be ''text'' or ''generation''') END AS mode),
chosen AS (
    SELECT run_id, any_value(model) AS model FROM runs
    WHERE ($runs::VARCHAR[] IS NULL OR list_contains($runs::VARCHAR[], run_id))
      AND list_contains(alphas, $alpha::DOUBLE)
      AND ((SELECT mode FROM checked) IS NULL
           OR (CASE WHEN max_new_tokens > 0 THEN 'generation' ELSE 'text' END)
              = (SELECT mode FROM checked))
    GROUP BY run_id),
ids AS (SELECT coalesce(list(run_id), []::VARCHAR[]) AS runs FROM chosen),
per_layer AS (
    SELECT a, b, jsd AS d
    FROM jsd_layers(true, NULL, NULL, NULL, NULL, NULL, NULL, $alpha::DOUBLE,
                    (SELECT runs FROM ids), $skip_positions::INTEGER, $bin_width::DOUBLE)
    WHERE $metric::VARCHAR = 'jsd'
    UNION ALL
    SELECT a, b, wasserstein
    FROM w1_layers(true, NULL, NULL, NULL, NULL, NULL, NULL, $alpha::DOUBLE,
                   (SELECT runs FROM ids), $skip_positions::INTEGER)
    WHERE $metric::VARCHAR = 'wasserstein'),
pairs AS (
    SELECT a, b, count(*) AS n_layers, avg(d) AS distance FROM per_layer GROUP BY ALL
    UNION ALL
    SELECT a, b, n_layers, distance
    FROM fisher_rao_runs($alpha::DOUBLE, (SELECT runs FROM ids), $skip_positions::INTEGER)
    WHERE $metric::VARCHAR = 'fisher_rao'),
entries AS (
    SELECT a, b, n_layers, distance FROM pairs
    UNION ALL SELECT b, a, n_layers, distance FROM pairs
    UNION ALL SELECT c.run_id, c.run_id, l.n_layers, 0.0
    FROM chosen c JOIN (SELECT DISTINCT run_id, n_layers FROM run_layers) l USING (run_id))
SELECT (SELECT metric FROM checked) AS metric, ca.model AS model_a, e.a AS run_a,
       cb.model AS model_b, e.b AS run_b, e.n_layers, e.distance
FROM entries e JOIN chosen ca ON ca.run_id = e.a JOIN chosen cb ON cb.run_id = e.b
ORDER BY model_a, run_a, model_b, run_b;
