"""Workers placed on a cluster and scaled with the queue: the controller (controller),
and the engines that place workers, Ray (ray_pool) and Slurm (slurm_pool); `lbs
cluster` (cli) runs them. Ray is imported only by ray_pool, when a Ray pool is used."""
