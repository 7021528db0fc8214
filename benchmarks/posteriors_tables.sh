#!/bin/bash
# the tables of docs/benchmarks_posteriors.rst, from the two result files
cd /work/wt/i15
D="AutoRealNVP:stl=1,num_layers=10,hidden_dims=32/32"
T=".venv/bin/python benchmarks/posteriors.py --table benchmarks/results/screen_2000steps.json benchmarks/results/compare_2000steps.json"
REN=("AutoRealNVP=>AutoRealNVP, before issue 15" "$D=>AutoRealNVP (defaults)")
ONLY=(AutoNormal AutoMultivariateNormal AutoIAFNormal RealNVP-hand AutoNICE AutoRealNVP "$D")
$T --models funnel banana bimodal eight_schools logistic unequal_groups gp horseshoe --only "${ONLY[@]}" --rename "${REN[@]}" \
  --columns elbo iw_elbo khat mean_err sd_err neck_sd mode_weight steps_run > benchmarks/results/compare_2000steps.txt
$T --models funnel banana bimodal eight_schools logistic unequal_groups gp horseshoe --only "$D" RealNVP-hand AutoNICE --rename "${REN[@]}" \
  --columns elbo iw_elbo khat mean_err_ir sd_err_ir neck_sd_ir mode_weight_ir > benchmarks/results/compare_2000steps_ir.txt
