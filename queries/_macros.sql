-- Macros and derived views installed by entropy_fast.sql.ProfileStore on every connection.
-- They hold the math that several named queries share, so each definition exists once.

-- Histogram bin of x for bins of width w anchored at 0: bin k = [k w, (k + 1) w).
-- Fixed bins (as distances.jsd_layer): a group's histogram does not depend on what it is
-- compared with.
CREATE OR REPLACE MACRO hist_bin(x, w) AS CAST(floor(x / w) AS BIGINT);

-- One bin's contribution to the Jensen-Shannon divergence (nats) of probabilities p, q:
-- (p ln(p/m) + q ln(q/m)) / 2 with m = (p + q) / 2 and 0 ln 0 = 0.
CREATE OR REPLACE MACRO jsd_term(p, q) AS
    0.5 * ((CASE WHEN p > 0 THEN p * ln(2 * p / (p + q)) ELSE 0 END)
         + (CASE WHEN q > 0 THEN q * ln(2 * q / (p + q)) ELSE 0 END));

-- Profiled layers of every unit: a model (p_by_run = false: the layers of all its runs)
-- or a run (p_by_run = true), with the deepest profiled layer and the number of layers.
CREATE OR REPLACE MACRO unit_layers(p_by_run) AS TABLE
    SELECT unit, layer, max(layer) OVER (PARTITION BY unit) AS max_layer,
           count(*) OVER (PARTITION BY unit) AS n_layers
    FROM (SELECT DISTINCT CASE WHEN p_by_run THEN run_id ELSE model END AS unit,
                          unnest(layer_indices) AS layer FROM runs);

-- Layer pairing at relative depth between every ordered pair of units (a unit with
-- itself included), the rule of distances.match_layers: the unit with fewer profiled
-- layers (ties: the smaller name) is the "short" one; each of its layers is paired with
-- the layer of the other unit at the nearest relative depth layer / max_layer (compared
-- exactly in integers; ties: the shallower). Equal layer lists pair layer by layer.
-- key = the short unit's layer, so (A, B) and (B, A) pair the same layers.
CREATE OR REPLACE MACRO depth_pairs(p_by_run) AS TABLE
    WITH layers AS (SELECT * FROM unit_layers(p_by_run)),
    units AS (SELECT DISTINCT unit, n_layers FROM layers),
    ordered AS (
        SELECT s.unit AS short, l.unit AS long FROM units s JOIN units l
        ON (s.n_layers, s.unit) <= (l.n_layers, l.unit)),
    matched AS (
        SELECT o.short, o.long, s.layer AS short_layer,
               arg_min(l.layer, {'gap': abs(s.layer * l.max_layer - l.layer * s.max_layer),
                                 'layer': l.layer}) AS long_layer
        FROM ordered o
        JOIN layers s ON s.unit = o.short
        JOIN layers l ON l.unit = o.long
        GROUP BY ALL)
    SELECT short AS a, long AS b, short_layer AS layer_a, long_layer AS layer_b,
           short_layer AS key FROM matched
    UNION
    SELECT long, short, long_layer, short_layer, short_layer FROM matched;

-- Layers of every model (the union over its runs).
CREATE OR REPLACE VIEW model_layers AS
    SELECT unit AS model, layer, max_layer, n_layers FROM unit_layers(false);

-- Layers of every run.
CREATE OR REPLACE VIEW run_layers AS
    SELECT unit AS run_id, layer, max_layer, n_layers FROM unit_layers(true);

-- Layer matching between every ordered pair of models (depth_pairs); `part` numbers each
-- compared (pair of models, pair of layers).
CREATE OR REPLACE VIEW layer_map AS
    SELECT a AS model_a, b AS model_b, layer_a, layer_b, key,
           row_number() OVER (ORDER BY a, b, key) AS part FROM depth_pairs(false);

-- The same between every ordered pair of runs: two runs of one model are two units.
CREATE OR REPLACE VIEW run_layer_map AS
    SELECT a AS run_a, b AS run_b, layer_a, layer_b, key,
           row_number() OVER (ORDER BY a, b, key) AS part FROM depth_pairs(true);

-- The parts of layer_map (p_by_run = false) or run_layer_map, their units as a and b.
CREATE OR REPLACE MACRO pair_map(p_by_run) AS TABLE
    SELECT model_a AS a, model_b AS b, layer_a, layer_b, key, part FROM layer_map
    WHERE NOT p_by_run
    UNION ALL
    SELECT run_a, run_b, layer_a, layer_b, key, part FROM run_layer_map WHERE p_by_run;

-- Per prompt mean profile: the mean entropy over a prompt's tokens at each layer.
CREATE OR REPLACE VIEW prompt_profile AS
    SELECT model, run_id, alpha, prompt_id, layer, count(*) AS n_tokens,
           avg(entropy) AS mean_entropy
    FROM entropy GROUP BY ALL;

-- Samples for the distance macros: one row per token entropy x, tagged with the
-- layer_map row it is compared in (part: the pair of models and the matched layers) and
-- its side g (0 = model_a's, 1 = model_b's). Rows stay narrow: sorting them is the cost.
-- Two groups: side 0 = rows of p_model_a [in run p_run_a] [among prompts p_prompts_a],
-- side 1 likewise from the p_*_b arguments.
CREATE OR REPLACE MACRO group_samples(p_model_a, p_run_a, p_prompts_a,
                                      p_model_b, p_run_b, p_prompts_b, p_alpha) AS TABLE
    WITH pairs AS (SELECT * FROM layer_map WHERE model_a = p_model_a AND model_b = p_model_b)
    SELECT p.part, 0 AS g, e.entropy::DOUBLE AS x
    FROM pairs p JOIN entropy e ON e.model = p.model_a AND e.layer = p.layer_a
    WHERE e.alpha = p_alpha AND (p_run_a IS NULL OR e.run_id = p_run_a)
      AND (p_prompts_a IS NULL OR list_contains(p_prompts_a, e.prompt_id))
    UNION ALL
    SELECT p.part, 1, e.entropy::DOUBLE
    FROM pairs p JOIN entropy e ON e.model = p.model_b AND e.layer = p.layer_b
    WHERE e.alpha = p_alpha AND (p_run_b IS NULL OR e.run_id = p_run_b)
      AND (p_prompts_b IS NULL OR list_contains(p_prompts_b, e.prompt_id));

-- Every unordered pair of the runs p_runs (run_a < run_b), each run on its own (never
-- pooled with another), its first p_skip rows of every prompt left out (pos >= p_skip).
CREATE OR REPLACE MACRO run_pair_samples(p_alpha, p_runs, p_skip) AS TABLE
    WITH pairs AS (SELECT * FROM run_layer_map WHERE run_a < run_b
                   AND list_contains(p_runs, run_a) AND list_contains(p_runs, run_b)),
    sel AS (SELECT run_id, layer, entropy::DOUBLE AS x FROM entropy
            WHERE alpha = p_alpha AND pos >= p_skip AND list_contains(p_runs, run_id))
    SELECT p.part, 0 AS g, s.x
    FROM pairs p JOIN sel s ON s.run_id = p.run_a AND s.layer = p.layer_a
    UNION ALL
    SELECT p.part, 1, s.x
    FROM pairs p JOIN sel s ON s.run_id = p.run_b AND s.layer = p.layer_b;

-- Either of the two above: p_by_run = true selects run_pair_samples.
CREATE OR REPLACE MACRO distance_samples(p_by_run, p_model_a, p_run_a, p_prompts_a,
                                         p_model_b, p_run_b, p_prompts_b, p_alpha,
                                         p_runs, p_skip) AS TABLE
    SELECT * FROM group_samples(p_model_a, p_run_a, p_prompts_a, p_model_b, p_run_b,
                                p_prompts_b, p_alpha) WHERE NOT p_by_run
    UNION ALL
    SELECT * FROM run_pair_samples(p_alpha, p_runs, p_skip) WHERE p_by_run;

-- Histogram JSD per matched layer (the definition of distances.jsd_layer): bins of width
-- p_bin_width nats anchored at 0 (hist_bin); p, q = the two sides' bin frequencies;
-- jsd = sum over bins of jsd_term(p, q), in nats, within [0, ln 2].
-- Output: a, b (the models, or the runs when p_by_run), key, layer_a, layer_b, n_a, n_b,
-- jsd.
CREATE OR REPLACE MACRO jsd_layers(p_by_run, p_model_a, p_run_a, p_prompts_a,
                                   p_model_b, p_run_b, p_prompts_b, p_alpha, p_runs,
                                   p_skip, p_bin_width) AS TABLE
    WITH c AS (SELECT part, hist_bin(x, p_bin_width) AS bin,
                      count(*) FILTER (WHERE g = 0) AS ca, count(*) FILTER (WHERE g = 1) AS cb
               FROM distance_samples(p_by_run, p_model_a, p_run_a, p_prompts_a, p_model_b,
                                     p_run_b, p_prompts_b, p_alpha, p_runs, p_skip)
               GROUP BY ALL),
    t AS (SELECT part, sum(ca)::BIGINT AS n_a, sum(cb)::BIGINT AS n_b FROM c GROUP BY ALL
          HAVING n_a > 0 AND n_b > 0),
    d AS (SELECT part, sum(jsd_term(c.ca / t.n_a, c.cb / t.n_b)) AS jsd
          FROM c JOIN t USING (part) GROUP BY ALL)
    SELECT m.a, m.b, m.key, m.layer_a, m.layer_b, t.n_a, t.n_b, d.jsd
    FROM d JOIN t USING (part) JOIN pair_map(p_by_run) m USING (part);

-- Exact Wasserstein-1 per matched layer (the definition of distances.wasserstein_layer,
-- equal to scipy.stats.wasserstein_distance): the integral of |F_a(x) - F_b(x)| dx over
-- the sorted union of both sides' values, F the empirical CDFs. Each value weighs
-- +1/n_a (side 0) or -1/n_b (side 1); the running sum over the union (peers included:
-- the default RANGE frame) is F_a - F_b on the gap to the next value.
-- Output: a, b (the models, or the runs when p_by_run), key, layer_a, layer_b, n_a, n_b,
-- wasserstein.
CREATE OR REPLACE MACRO w1_layers(p_by_run, p_model_a, p_run_a, p_prompts_a,
                                  p_model_b, p_run_b, p_prompts_b, p_alpha, p_runs,
                                  p_skip) AS TABLE
    WITH s AS (SELECT * FROM distance_samples(p_by_run, p_model_a, p_run_a, p_prompts_a,
                                              p_model_b, p_run_b, p_prompts_b, p_alpha,
                                              p_runs, p_skip)),
    t AS (SELECT part, count(*) FILTER (WHERE g = 0) AS n_a,
                 count(*) FILTER (WHERE g = 1) AS n_b
          FROM s GROUP BY ALL HAVING n_a > 0 AND n_b > 0),
    w AS (SELECT part, x, CASE WHEN g = 0 THEN 1.0::DOUBLE / n_a ELSE -1.0::DOUBLE / n_b END AS w
          FROM s JOIN t USING (part)),
    cdf AS (SELECT part, sum(w) OVER win AS d, lead(x) OVER win - x AS dx
            FROM w WINDOW win AS (PARTITION BY part ORDER BY x)),
    d AS (SELECT part, coalesce(sum(abs(d) * dx), 0) AS wasserstein FROM cdf GROUP BY ALL)
    SELECT m.a, m.b, m.key, m.layer_a, m.layer_b, t.n_a, t.n_b, d.wasserstein
    FROM d JOIN t USING (part) JOIN pair_map(p_by_run) m USING (part);

-- Fisher-Rao distance between the mean profiles of every unordered pair of the runs
-- p_runs (run_a < run_b; the definition of distances.fisher_rao_distance): at the layers
-- run_layer_map pairs, m = the run's mean entropy over its tokens (pos >= p_skip),
-- negatives as 0; p = m_a / sum m_a, q = m_b / sum m_b over the paired layers;
-- d = 4 asin(||sqrt p - sqrt q|| / 2) in [0, pi] (NULL where a mean profile sums to 0).
-- Output: a, b, n_layers, distance.
CREATE OR REPLACE MACRO fisher_rao_runs(p_alpha, p_runs, p_skip) AS TABLE
    WITH means AS (
        SELECT run_id, layer, greatest(avg(entropy::DOUBLE), 0) AS m FROM entropy
        WHERE alpha = p_alpha AND pos >= p_skip AND list_contains(p_runs, run_id)
        GROUP BY ALL),
    paired AS (
        SELECT p.run_a AS a, p.run_b AS b, ma.m AS ma, mb.m AS mb
        FROM run_layer_map p
        JOIN means ma ON ma.run_id = p.run_a AND ma.layer = p.layer_a
        JOIN means mb ON mb.run_id = p.run_b AND mb.layer = p.layer_b
        WHERE p.run_a < p.run_b),
    totals AS (SELECT a, b, count(*) AS n_layers, sum(ma) AS ta, sum(mb) AS tb
               FROM paired GROUP BY ALL)
    SELECT a, b, any_value(n_layers) AS n_layers,
           CASE WHEN any_value(ta) > 0 AND any_value(tb) > 0 THEN
               4 * asin(least(sqrt(sum((sqrt(ma / ta) - sqrt(mb / tb)) ^ 2)) / 2, 1))
           END AS distance
    FROM paired JOIN totals USING (a, b) GROUP BY ALL;
