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

-- Layers of every model, with the deepest profiled layer and the number of layers.
CREATE OR REPLACE VIEW model_layers AS
    SELECT model, layer, max(layer) OVER (PARTITION BY model) AS max_layer,
           count(*) OVER (PARTITION BY model) AS n_layers
    FROM (SELECT DISTINCT model, unnest(layer_indices) AS layer FROM runs);

-- Layer matching between every ordered pair of models (a model with itself included).
-- The model with fewer profiled layers (ties: the smaller name) is the "short" one; each
-- of its layers is matched with the layer of the other model at the nearest relative
-- depth layer / max_layer (compared exactly in integers; ties: the shallower). Equal
-- layer lists match layer by layer. key = the short model's layer, so (A, B) and (B, A)
-- pair the same layers.
CREATE OR REPLACE VIEW layer_map AS
    WITH models AS (SELECT DISTINCT model, n_layers FROM model_layers),
    ordered AS (
        SELECT s.model AS short, l.model AS long FROM models s JOIN models l
        ON (s.n_layers, s.model) <= (l.n_layers, l.model)),
    matched AS (
        SELECT o.short, o.long, s.layer AS short_layer,
               arg_min(l.layer, {'gap': abs(s.layer * l.max_layer - l.layer * s.max_layer),
                                 'layer': l.layer}) AS long_layer
        FROM ordered o
        JOIN model_layers s ON s.model = o.short
        JOIN model_layers l ON l.model = o.long
        GROUP BY ALL)
    SELECT *, row_number() OVER (ORDER BY model_a, model_b, key) AS part FROM (
        SELECT short AS model_a, long AS model_b, short_layer AS layer_a,
               long_layer AS layer_b, short_layer AS key FROM matched
        UNION
        SELECT long, short, long_layer, short_layer, short_layer FROM matched);

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

-- Every unordered pair of models (model_a < model_b), each model pooled over the runs in
-- p_runs (NULL: all runs).
CREATE OR REPLACE MACRO model_pair_samples(p_alpha, p_runs) AS TABLE
    WITH pairs AS (SELECT * FROM layer_map WHERE model_a < model_b),
    sel AS (SELECT model, layer, entropy::DOUBLE AS x FROM entropy
            WHERE alpha = p_alpha AND (p_runs IS NULL OR list_contains(p_runs, run_id)))
    SELECT p.part, 0 AS g, s.x
    FROM pairs p JOIN sel s ON s.model = p.model_a AND s.layer = p.layer_a
    UNION ALL
    SELECT p.part, 1, s.x
    FROM pairs p JOIN sel s ON s.model = p.model_b AND s.layer = p.layer_b;

-- Either of the two above: p_all_pairs = true selects model_pair_samples.
CREATE OR REPLACE MACRO distance_samples(p_all_pairs, p_model_a, p_run_a, p_prompts_a,
                                         p_model_b, p_run_b, p_prompts_b, p_alpha,
                                         p_runs) AS TABLE
    SELECT * FROM group_samples(p_model_a, p_run_a, p_prompts_a, p_model_b, p_run_b,
                                p_prompts_b, p_alpha) WHERE NOT p_all_pairs
    UNION ALL
    SELECT * FROM model_pair_samples(p_alpha, p_runs) WHERE p_all_pairs;

-- Histogram JSD per matched layer (the definition of distances.jsd_layer): bins of width
-- p_bin_width nats anchored at 0 (hist_bin); p, q = the two sides' bin frequencies;
-- jsd = sum over bins of jsd_term(p, q), in nats, within [0, ln 2].
-- Output: model_a, model_b, key, layer_a, layer_b, n_a, n_b, jsd.
CREATE OR REPLACE MACRO jsd_layers(p_all_pairs, p_model_a, p_run_a, p_prompts_a,
                                   p_model_b, p_run_b, p_prompts_b, p_alpha, p_runs,
                                   p_bin_width) AS TABLE
    WITH c AS (SELECT part, hist_bin(x, p_bin_width) AS bin,
                      count(*) FILTER (WHERE g = 0) AS ca, count(*) FILTER (WHERE g = 1) AS cb
               FROM distance_samples(p_all_pairs, p_model_a, p_run_a, p_prompts_a, p_model_b,
                                     p_run_b, p_prompts_b, p_alpha, p_runs)
               GROUP BY ALL),
    t AS (SELECT part, sum(ca)::BIGINT AS n_a, sum(cb)::BIGINT AS n_b FROM c GROUP BY ALL
          HAVING n_a > 0 AND n_b > 0),
    d AS (SELECT part, sum(jsd_term(c.ca / t.n_a, c.cb / t.n_b)) AS jsd
          FROM c JOIN t USING (part) GROUP BY ALL)
    SELECT m.model_a, m.model_b, m.key, m.layer_a, m.layer_b, t.n_a, t.n_b, d.jsd
    FROM d JOIN t USING (part) JOIN layer_map m USING (part);

-- Exact Wasserstein-1 per matched layer (the definition of distances.wasserstein_layer,
-- equal to scipy.stats.wasserstein_distance): the integral of |F_a(x) - F_b(x)| dx over
-- the sorted union of both sides' values, F the empirical CDFs. Each value weighs
-- +1/n_a (side 0) or -1/n_b (side 1); the running sum over the union (peers included:
-- the default RANGE frame) is F_a - F_b on the gap to the next value.
-- Output: model_a, model_b, key, layer_a, layer_b, n_a, n_b, wasserstein.
CREATE OR REPLACE MACRO w1_layers(p_all_pairs, p_model_a, p_run_a, p_prompts_a,
                                  p_model_b, p_run_b, p_prompts_b, p_alpha, p_runs) AS TABLE
    WITH s AS (SELECT * FROM distance_samples(p_all_pairs, p_model_a, p_run_a, p_prompts_a,
                                              p_model_b, p_run_b, p_prompts_b, p_alpha,
                                              p_runs)),
    t AS (SELECT part, count(*) FILTER (WHERE g = 0) AS n_a,
                 count(*) FILTER (WHERE g = 1) AS n_b
          FROM s GROUP BY ALL HAVING n_a > 0 AND n_b > 0),
    w AS (SELECT part, x, CASE WHEN g = 0 THEN 1.0::DOUBLE / n_a ELSE -1.0::DOUBLE / n_b END AS w
          FROM s JOIN t USING (part)),
    cdf AS (SELECT part, sum(w) OVER win AS d, lead(x) OVER win - x AS dx
            FROM w WINDOW win AS (PARTITION BY part ORDER BY x)),
    d AS (SELECT part, coalesce(sum(abs(d) * dx), 0) AS wasserstein FROM cdf GROUP BY ALL)
    SELECT m.model_a, m.model_b, m.key, m.layer_a, m.layer_b, t.n_a, t.n_b, d.wasserstein
    FROM d JOIN t USING (part) JOIN layer_map m USING (part);
