-- Per model, run, alpha and layer over all tokens: count, mean, sample std, min, quantiles (linear interpolation, as numpy.percentile) and max of entropy.
-- @param model VARCHAR = NULL : only this model
-- @param run_id VARCHAR = NULL : only this run
-- @param alpha DOUBLE = NULL : only this Rényi order
SELECT model, run_id, alpha, layer, n, mean, std, min,
       q[1] AS q05, q[2] AS q25, q[3] AS median, q[4] AS q75, q[5] AS q95, max
FROM (
    SELECT model, run_id, alpha, layer, count(*) AS n, avg(entropy) AS mean,
           stddev_samp(entropy) AS std, min(entropy) AS min, max(entropy) AS max,
           quantile_cont(entropy::DOUBLE, [0.05, 0.25, 0.5, 0.75, 0.95]) AS q
    FROM entropy
    WHERE ($model::VARCHAR IS NULL OR model = $model)
      AND ($run_id::VARCHAR IS NULL OR run_id = $run_id)
      AND ($alpha::DOUBLE IS NULL OR alpha = $alpha)
    GROUP BY ALL
)
ORDER BY model, run_id, alpha, layer;
