# `make demo`: the whole pipeline on generated data, random weights and small images (a few minutes on 2 CPUs).
# Everything it writes stays under demo/ so it never touches real data, models or submissions.
PY ?= python
DEMO := demo
D := --data-dir $(DEMO)/data --model-dir $(DEMO)/model
HEAD := --batch-size 16

.PHONY: demo test lint clean-demo
demo:
	$(PY) 01_reorganize_data.py $(D) --demo 50
	$(PY) 02_extract_features.py $(D) --weights none --image-size 75 --models ResNet50 InceptionV3 Xception
	$(PY) 03_train_single.py $(D) $(HEAD) --submissions-dir $(DEMO)/submissions
	$(PY) 04_finetune_split.py $(D) --weights none --image-size 75 $(HEAD) --init all --epochs 10
	$(PY) 05_train_merge.py $(D) $(HEAD) --combos
	$(PY) 06_hyperopt_merge.py $(D) $(HEAD) --max-evals 3 --epochs 20
	$(PY) 08_export_model.py $(D)
	$(PY) 07_predict_submit.py $(D) --output $(DEMO)/submissions/submission.csv --analyze
	$(PY) predict.py $(DEMO)/data/test/1.jpg $(DEMO)/data/test/2.jpg $(DEMO)/data/test/3.jpg \
		--model $(DEMO)/model/export/catdog.keras --cam $(DEMO)/cam
	$(PY) predict.py $(DEMO)/data/test/1.jpg $(DEMO)/data/test/2.jpg $(DEMO)/data/test/3.jpg \
		--model $(DEMO)/model/export/catdog.tflite --json
	@echo "demo done: $(DEMO)/submissions/submission.csv, Grad-CAM overlays in $(DEMO)/cam/ and $(DEMO)/model/analysis/cam/"

test:
	$(PY) -m pytest -q

lint:
	ruff check .

clean-demo:
	rm -rf $(DEMO)
