-- Mean KL divergence to the final layer, KL(p_final || p_layer), per model, run and layer over all tokens (runs profiled with --kl-to-final; the run's unit: nats, or bits with --base 2): count, mean, sample std and median.
-- @param model VARCHAR = NULL : only this model
-- @param run_id VARCHAR = NULL : only this run
SELECT model, run_id, layer, count(*) AS n, avg(kl_to_final) AS mean_kl,
       stddev_samp(kl_to_final) AS std_kl, median(kl_to_final) AS median_kl
FROM entropy
WHERE kl_to_final IS NOT NULL
  AND alpha = (SELECT min(alpha) FROM entropy e2 WHERE e2.run_id = entropy.run_id)
  AND ($model::VARCHAR IS NULL OR model = $model)
  AND ($run_id::VARCHAR IS NULL OR run_id = $run_id)
GROUP BY ALL
ORDER BY model, run_id, layer;
