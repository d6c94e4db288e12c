"""The trained models as the later stages use them: one loader and one inference object each.

    load_codec(folder, sigma_data)      -> LatentCodec.encode/decode fit-autoencoder (and a
                                                                     latent fit-diffusion's copy)
    load_denoiser(folder, which="ema")  -> (Denoiser, model.json)   fit-diffusion
    load_embedder(folder)               -> Embedder.embed            fit-embedder, audit-embedder
    load_reid(folder)                   -> ReidModel.embed, .scorer  fit-reid, audit-reid
    load_classifier(folder)             -> Classifier.predict_proba  fit-classifier

Images go in as float NumPy [N, R, R] in [0, 1] and results come back as NumPy (`batched`); the
denoiser and the autoencoder are the exceptions, torch modules the samplers drive. The trainers in
`unpersonal.training` write these folders; nothing here imports them.
"""
